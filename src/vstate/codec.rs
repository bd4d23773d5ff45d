//! serde for KVM's plain structs, strict about sizes.
//!
//! kvm-bindings' own serde (its `serde` feature) writes a struct as its bytes but reads a
//! blob of any length, zero-padding or cutting it to fit. A snapshot file is hostile input:
//! a blob of the wrong length means a corrupt or foreign file, so here it is an error, and a
//! list longer than KVM takes is an error too, found before it is all read into memory.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// Reads a byte string (or a sequence of bytes) of exactly `len` bytes.
struct ExactBytes {
    len: usize,
    what: &'static str,
}

impl ExactBytes {
    fn check<E: de::Error>(&self, got: usize) -> Result<(), E> {
        if got == self.len {
            Ok(())
        } else {
            Err(E::custom(format!(
                "{} is {got} bytes long, expected {}",
                self.what, self.len
            )))
        }
    }
}

impl<'de> Visitor<'de> for ExactBytes {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{} as {} bytes", self.what, self.len)
    }

    fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
        self.check(bytes.len())?;
        Ok(bytes.to_vec())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
        let mut out = Vec::with_capacity(self.len);
        while let Some(b) = seq.next_element::<u8>()? {
            if out.len() == self.len {
                // Longer than it may be: say so without reading the rest.
                return Err(de::Error::custom(format!(
                    "{} is longer than {} bytes",
                    self.what, self.len
                )));
            }
            out.push(b);
        }
        self.check(out.len())?;
        Ok(out)
    }
}

fn type_name<T>() -> &'static str {
    let full = std::any::type_name::<T>();
    full.rsplit("::").next().unwrap_or(full)
}

/// `#[serde(with = "exact")]`: a KVM struct as its exact bytes.
pub(crate) mod exact {
    use super::*;

    /// Writes `value` as a byte string.
    pub fn serialize<T: IntoBytes + Immutable, S: Serializer>(
        value: &T,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(value.as_bytes())
    }

    /// Reads a `T` from exactly `size_of::<T>()` bytes.
    pub fn deserialize<'de, T: FromBytes, D: Deserializer<'de>>(d: D) -> Result<T, D::Error> {
        let bytes = d.deserialize_bytes(ExactBytes {
            len: std::mem::size_of::<T>(),
            what: type_name::<T>(),
        })?;
        T::read_from_bytes(&bytes)
            .map_err(|_| de::Error::custom(format!("{} has the wrong size", type_name::<T>())))
    }
}

/// One element of a list of KVM structs, as its exact bytes.
pub(crate) struct Blob<T>(pub T);

impl<T: IntoBytes + Immutable> Serialize for Blob<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        exact::serialize(&self.0, s)
    }
}

impl<'de, T: FromBytes> Deserialize<'de> for Blob<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        exact::deserialize(d).map(Blob)
    }
}

/// Reads a sequence of at most `max` elements.
struct Bounded<T> {
    max: usize,
    what: &'static str,
    _t: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for Bounded<T> {
    type Value = Vec<T>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a list of at most {} {}", self.max, self.what)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max));
        while let Some(item) = seq.next_element()? {
            if out.len() == self.max {
                return Err(de::Error::custom(format!(
                    "more than {} {}",
                    self.max, self.what
                )));
            }
            out.push(item);
        }
        Ok(out)
    }
}

/// Reads a list of at most `max` serde values.
pub(crate) fn bounded_vec<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
    max: usize,
    what: &'static str,
) -> Result<Vec<T>, D::Error> {
    d.deserialize_seq(Bounded {
        max,
        what,
        _t: PhantomData,
    })
}

/// Writes a list of KVM structs, each as its bytes.
pub(crate) fn serialize_blobs<T: IntoBytes + Immutable, S: Serializer>(
    items: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(items.iter().map(|i| BlobRef(i)))
}

struct BlobRef<'a, T>(&'a T);

impl<T: IntoBytes + Immutable> Serialize for BlobRef<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        exact::serialize(self.0, s)
    }
}

/// Reads a list of at most `max` KVM structs, each from its exact bytes.
pub(crate) fn bounded_blobs<'de, T: FromBytes + DeserializeOwned, D: Deserializer<'de>>(
    d: D,
    max: usize,
    what: &'static str,
) -> Result<Vec<T>, D::Error> {
    let blobs: Vec<Blob<T>> = bounded_vec(d, max, what)?;
    Ok(blobs.into_iter().map(|b| b.0).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_regs;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Holder {
        #[serde(with = "exact")]
        regs: kvm_regs,
        #[serde(deserialize_with = "three_u8s")]
        small: Vec<u8>,
    }

    fn three_u8s<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        bounded_vec(d, 3, "bytes")
    }

    fn holder() -> Holder {
        Holder {
            regs: kvm_regs {
                rax: 0x1122_3344,
                rip: 0xfff0,
                ..Default::default()
            },
            small: vec![1, 2, 3],
        }
    }

    #[test]
    fn exact_blob_survives_a_json_round_trip() {
        let json = serde_json::to_string(&holder()).unwrap();
        let back: Holder = serde_json::from_str(&json).unwrap();
        assert_eq!(back, holder());
    }

    #[test]
    fn blob_of_the_wrong_length_is_an_error() {
        let mut value = serde_json::to_value(holder()).unwrap();
        let regs = value["regs"].as_array_mut().unwrap();
        regs.pop();
        let err = serde_json::from_value::<Holder>(value.clone()).unwrap_err();
        assert!(err.to_string().contains("expected 144"), "{err}");

        let regs = value["regs"].as_array_mut().unwrap();
        regs.extend([0.into(), 0.into()]);
        let err = serde_json::from_value::<Holder>(value).unwrap_err();
        assert!(err.to_string().contains("longer than 144"), "{err}");
    }

    #[test]
    fn list_longer_than_its_bound_is_an_error() {
        let mut value = serde_json::to_value(holder()).unwrap();
        value["small"] = serde_json::json!([1, 2, 3, 4]);
        let err = serde_json::from_value::<Holder>(value).unwrap_err();
        assert!(err.to_string().contains("more than 3 bytes"), "{err}");
    }
}
