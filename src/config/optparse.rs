//! The one parser for every `key=value,key=value` option spelling (`--disk`, `--net`,
//! `--cpus`, ...). The pairs are handed to serde as a map of strings, so an option's keys,
//! aliases, defaults and types are declared once, on the same struct that definition files,
//! the API and snapshot manifests use. Values are typed by the field they land in: `on`/`off`
//! (and yes/no, true/false) for booleans, decimal numbers, enum variants by name. A comma
//! inside a value is written twice (`path=a,,b.img`), as qemu does.

use std::fmt;

use serde::de::{self, DeserializeOwned, IntoDeserializer, MapAccess, Visitor};
use serde::forward_to_deserialize_any;

use super::ConfigError;

/// A serde error carrying one line of text.
#[derive(Debug)]
pub struct OptError(String);

impl fmt::Display for OptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for OptError {}

impl de::Error for OptError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        OptError(msg.to_string())
    }
}

/// Splits `spec` at single commas (`,,` is a literal comma) into `(key, value)` pairs. An
/// item without `=` is the value of `bare_key` when it comes first and a bare key is allowed.
pub fn split_pairs(spec: &str, bare_key: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    let mut pairs = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => pairs.push((k.to_string(), v.to_string())),
            None if i == 0 && bare_key.is_some() && !item.is_empty() => {
                pairs.push((bare_key.unwrap_or_default().to_string(), item))
            }
            _ if item.is_empty() => return Err("empty item (a stray comma?)".into()),
            _ => return Err(format!("'{item}' is not key=value")),
        }
    }
    Ok(pairs)
}

/// Parses `spec` into `T`; errors name `option`.
pub fn parse<T: DeserializeOwned>(
    option: &str,
    spec: &str,
    bare_key: Option<&str>,
) -> Result<T, ConfigError> {
    let pairs = split_pairs(spec, bare_key).map_err(|m| ConfigError::new(option, m))?;
    from_pairs(pairs).map_err(|e| ConfigError::new(option, e.0))
}

/// Deserializes `T` from key/value pairs.
pub fn from_pairs<T: DeserializeOwned>(pairs: Vec<(String, String)>) -> Result<T, OptError> {
    T::deserialize(PairsDeserializer { pairs })
}

struct PairsDeserializer {
    pairs: Vec<(String, String)>,
}

impl<'de> de::Deserializer<'de> for PairsDeserializer {
    type Error = OptError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptError> {
        visitor.visit_map(PairsAccess {
            iter: self.pairs.into_iter(),
            value: None,
        })
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

struct PairsAccess {
    iter: std::vec::IntoIter<(String, String)>,
    value: Option<(String, String)>,
}

impl<'de> MapAccess<'de> for PairsAccess {
    type Error = OptError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, OptError> {
        match self.iter.next() {
            Some((k, v)) => {
                let key = seed.deserialize(k.as_str().into_deserializer())?;
                self.value = Some((k, v));
                Ok(Some(key))
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, OptError> {
        let (key, value) = self
            .value
            .take()
            .ok_or_else(|| OptError("value without a key".into()))?;
        seed.deserialize(ValueDeserializer { value: &value })
            .map_err(|e| OptError(format!("{key}={value}: {e}")))
    }
}

/// One value, typed by the field it is deserialized into.
pub struct ValueDeserializer<'a> {
    /// The text after `=`.
    pub value: &'a str,
}

impl ValueDeserializer<'_> {
    fn number<T: std::str::FromStr>(&self) -> Result<T, OptError> {
        self.value
            .trim()
            .parse()
            .map_err(|_| OptError(format!("'{}' is not a valid number", self.value)))
    }
}

/// Parses the on/off spellings.
pub fn parse_switch(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "1" => Some(true),
        "off" | "no" | "false" | "0" => Some(false),
        _ => None,
    }
}

macro_rules! number {
    ($($method:ident $visit:ident;)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptError> {
            visitor.$visit(self.number()?)
        })*
    };
}

impl<'de> de::Deserializer<'de> for ValueDeserializer<'_> {
    type Error = OptError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptError> {
        visitor.visit_str(self.value)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptError> {
        match parse_switch(self.value) {
            Some(b) => visitor.visit_bool(b),
            None => Err(OptError(format!("'{}' is not on or off", self.value))),
        }
    }

    number! {
        deserialize_u8 visit_u8; deserialize_u16 visit_u16; deserialize_u32 visit_u32;
        deserialize_u64 visit_u64; deserialize_i8 visit_i8; deserialize_i16 visit_i16;
        deserialize_i32 visit_i32; deserialize_i64 visit_i64;
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OptError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, OptError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, OptError> {
        visitor.visit_enum(self.value.into_deserializer())
    }

    forward_to_deserialize_any! {
        i128 u128 f32 f64 char str string bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "lowercase")]
    enum Kind {
        Raw,
        Qcow2,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Spec {
        #[serde(alias = "file")]
        path: String,
        #[serde(default)]
        readonly: bool,
        format: Option<Kind>,
        #[serde(default)]
        count: u32,
    }

    fn spec(s: &str) -> Result<Spec, ConfigError> {
        parse("--thing", s, Some("path"))
    }

    #[test]
    fn typed_values_aliases_and_bare_first_item() {
        let s = spec("a.img,readonly=on,format=qcow2,count=7").unwrap();
        assert_eq!(
            s,
            Spec {
                path: "a.img".into(),
                readonly: true,
                format: Some(Kind::Qcow2),
                count: 7
            }
        );
        assert_eq!(spec("file=b").unwrap().path, "b");
        assert!(!spec("path=b,readonly=off").unwrap().readonly);
    }

    #[test]
    fn doubled_commas_are_literal() {
        assert_eq!(spec("path=a,,b.img,count=1").unwrap().path, "a,b.img");
    }

    #[test]
    fn errors_name_the_option_the_key_and_the_value() {
        let e = spec("path=a,readonly=maybe").unwrap_err();
        assert_eq!(e.option, "--thing");
        assert!(e.message.contains("readonly=maybe"), "{e}");
        let e = spec("path=a,format=vmdk").unwrap_err();
        assert!(
            e.message.contains("vmdk") && e.message.contains("qcow2"),
            "{e}"
        );
        let e = spec("path=a,colour=red").unwrap_err();
        assert!(e.message.contains("unknown field `colour`"), "{e}");
        assert!(spec("path=a,count=-1").is_err());
        assert_eq!(spec("path=a,,,count=1").unwrap().path, "a,");
        assert!(spec("path=a,count=1,").is_err());
        assert!(spec("readonly=on").unwrap_err().message.contains("path"));
        assert!(spec("path=a,path=b")
            .unwrap_err()
            .message
            .contains("duplicate"));
        assert!(spec("a,junk")
            .unwrap_err()
            .message
            .contains("not key=value"));
        assert!(spec("").is_err());
    }
}
