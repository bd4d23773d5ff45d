//! Value types of the config model with their serde spellings: sizes (`"256M"`, or a bare
//! number of MiB as qemu's `-m`), MACs, the serial mode, CPU feature edits, vCPU counts.
//! Each has one text form shared by the command line, definition files and the API.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use boot::x86_64::cpuid::FeatureEdits;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Parses a size: a number with an optional K/M/G/T suffix (binary units, optional `iB`/`B`);
/// a bare number means MiB, as qemu's `-m` does.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("'{s}' is not a size; use e.g. 256M or 2G"));
    }
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => 20,
        "K" | "KB" | "KIB" => 10,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        "B" => 0,
        other => {
            return Err(format!(
                "unknown size suffix '{other}' in '{s}'; use K, M, G or T"
            ))
        }
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1u64 << shift))
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// A size in bytes, written `256M`, `2G`, `4096B`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if b != 0 && b.is_multiple_of(1u64 << shift) {
                return write!(f, "{}{unit}", b >> shift);
            }
        }
        write!(f, "{b}B")
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as \"256M\" or a number of MiB")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                v.checked_mul(1 << 20)
                    .map(Size)
                    .ok_or_else(|| E::custom(format!("{v} MiB is too large")))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("a size cannot be negative"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Size, E> {
                parse_size(v).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A unicast MAC address, written `52:54:00:12:34:56`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a unicast MAC like 52:54:00:12:34:56");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (m, p) in mac.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 != 0 {
            return Err(bad());
        }
        Ok(Mac(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// Serde through the text form of a type (`Display` + `FromStr`).
macro_rules! serde_as_text {
    ($t:ty, $what:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$t, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

serde_as_text!(Mac, "a MAC address such as \"52:54:00:12:34:56\"");

/// Where the guest's serial console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialMode {
    /// This process's stdin/stdout (raw mode on a terminal; Ctrl-] quits).
    #[default]
    Stdio,
    /// A new pseudo-terminal whose path is printed.
    Pty,
    /// Output appended to a file; no input.
    File(PathBuf),
    /// Only the VM's console log and `ember console` (how background VMs run).
    Log,
    /// Output discarded; no input.
    None,
}

impl FromStr for SerialMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(SerialMode::Stdio),
            "pty" => Ok(SerialMode::Pty),
            "log" => Ok(SerialMode::Log),
            "none" | "null" => Ok(SerialMode::None),
            _ => match s.strip_prefix("file=").or_else(|| s.strip_prefix("file:")) {
                Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
                _ => Err(format!(
                    "'{s}' is not a console; use stdio, pty, file=PATH, log or none"
                )),
            },
        }
    }
}

impl fmt::Display for SerialMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialMode::Stdio => f.write_str("stdio"),
            SerialMode::Pty => f.write_str("pty"),
            SerialMode::Log => f.write_str("log"),
            SerialMode::None => f.write_str("none"),
            SerialMode::File(p) => write!(f, "file={}", p.display()),
        }
    }
}

serde_as_text!(SerialMode, "a console: stdio, pty, file=PATH, log or none");

/// CPU feature edits, written `-cx16,+popcnt`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures(pub FeatureEdits);

impl CpuFeatures {
    /// No edits.
    pub fn is_empty(&self) -> bool {
        self.0.hide.is_empty() && self.0.show.is_empty()
    }
}

impl FromStr for CpuFeatures {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        FeatureEdits::parse(s)
            .map(CpuFeatures)
            .map_err(|e| e.to_string())
    }
}

impl fmt::Display for CpuFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let items: Vec<String> = (self.0.hide.iter().map(|n| format!("-{n}")))
            .chain(self.0.show.iter().map(|n| format!("+{n}")))
            .collect();
        f.write_str(&items.join(","))
    }
}

serde_as_text!(CpuFeatures, "CPU feature edits such as \"-cx16,+popcnt\"");

/// vCPUs: those present at boot and the most the VM may grow to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpusConfig {
    /// vCPUs at boot.
    pub boot: u8,
    /// Most vCPUs (hotplug); at least `boot`.
    pub max: u8,
}

impl Default for CpusConfig {
    fn default() -> Self {
        CpusConfig { boot: 1, max: 1 }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CpusSpec {
    boot: u8,
    max: Option<u8>,
}

impl From<CpusSpec> for CpusConfig {
    fn from(s: CpusSpec) -> Self {
        CpusConfig {
            boot: s.boot,
            max: s.max.unwrap_or(s.boot),
        }
    }
}

impl FromStr for CpusConfig {
    type Err = String;

    /// `N` or `boot=N[,max=M]`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(n) = s.trim().parse::<u8>() {
            return Ok(CpusConfig { boot: n, max: n });
        }
        let pairs = super::optparse::split_pairs(s, None)?;
        super::optparse::from_pairs::<CpusSpec>(pairs)
            .map(Into::into)
            .map_err(|e| format!("'{s}': {e}; use N or boot=N,max=M"))
    }
}

impl Serialize for CpusConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        if self.boot == self.max {
            return s.serialize_u8(self.boot);
        }
        let mut m = s.serialize_map(Some(2))?;
        m.serialize_entry("boot", &self.boot)?;
        m.serialize_entry("max", &self.max)?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for CpusConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = CpusConfig;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number of vCPUs or { boot = N, max = M }")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<CpusConfig, E> {
                let n = u8::try_from(v).map_err(|_| E::custom(format!("{v} vCPUs is too many")))?;
                Ok(CpusConfig { boot: n, max: n })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<CpusConfig, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom("a vCPU count cannot be negative"))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<CpusConfig, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<CpusConfig, A::Error> {
                CpusSpec::deserialize(de::value::MapAccessDeserializer::new(map)).map(Into::into)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_accept_suffixes_and_bare_mib() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256"), Ok(256 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("4096B"), Ok(4096));
        assert!(parse_size("12Q")
            .unwrap_err()
            .contains("unknown size suffix 'Q'"));
        assert!(parse_size("M").is_err());
        assert!(parse_size("-5M").is_err());
        assert!(parse_size("18446744073709551615G").is_err());
    }

    #[test]
    fn sizes_print_in_the_largest_exact_unit_and_round_trip() {
        for (bytes, text) in [
            (128u64 << 20, "128M"),
            (1 << 30, "1G"),
            (1536 << 10, "1536K"),
            (4097, "4097B"),
        ] {
            assert_eq!(Size(bytes).to_string(), text);
            assert_eq!(parse_size(text), Ok(bytes));
        }
        let v: Size = serde_json::from_str("64").unwrap();
        assert_eq!(v, Size(64 << 20));
        assert!(serde_json::from_str::<Size>("-1").is_err());
    }

    #[test]
    fn macs_parse_print_and_refuse_multicast() {
        let m: Mac = "52:54:00:ab:cd:ef".parse().unwrap();
        assert_eq!(m.to_string(), "52:54:00:ab:cd:ef");
        for bad in [
            "01:00:5e:00:00:01",
            "zz:00:00:00:00:00",
            "52:54:00",
            "5:54:00:00:00:00:00",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn serial_modes_round_trip_as_text() {
        for m in ["stdio", "pty", "log", "none", "file=/tmp/x.log"] {
            assert_eq!(m.parse::<SerialMode>().unwrap().to_string(), m);
        }
        assert!("file=".parse::<SerialMode>().is_err());
        assert!("tcp:1234".parse::<SerialMode>().is_err());
    }

    #[test]
    fn cpus_take_a_count_or_boot_and_max() {
        assert_eq!("2".parse(), Ok(CpusConfig { boot: 2, max: 2 }));
        assert_eq!("boot=1,max=4".parse(), Ok(CpusConfig { boot: 1, max: 4 }));
        assert!("boot=1,most=4".parse::<CpusConfig>().is_err());
        let c: CpusConfig = toml::from_str::<toml::Value>("c = { boot = 2, max = 3 }").unwrap()
            ["c"]
            .clone()
            .try_into()
            .unwrap();
        assert_eq!(c, CpusConfig { boot: 2, max: 3 });
        assert_eq!(
            serde_json::to_string(&CpusConfig { boot: 2, max: 2 }).unwrap(),
            "2"
        );
    }

    #[test]
    fn cpu_features_round_trip() {
        let f: CpuFeatures = "-cx16,+popcnt".parse().unwrap();
        assert_eq!(f.to_string(), "-cx16,+popcnt");
        assert!("-nosuch".parse::<CpuFeatures>().is_err());
    }
}
