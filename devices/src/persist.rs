//! Device state as data: each device with state has a serde state struct, saved and
//! restored through one trait, so a VM's devices can be written to a snapshot and brought
//! back in a new process. State read from a file is untrusted: `restore` checks it and
//! refuses what the device could not be in, never panicking.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A restore refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{device}: {message}")]
pub struct StateError {
    /// The device.
    pub device: &'static str,
    /// What is wrong with the state.
    pub message: String,
}

impl StateError {
    /// A refusal for `device`.
    pub fn new(device: &'static str, message: impl Into<String>) -> Self {
        StateError {
            device,
            message: message.into(),
        }
    }
}

/// A device whose state can be saved and restored.
pub trait Persist {
    /// The state, as plain serde data.
    type State: Serialize + DeserializeOwned + Clone + PartialEq + std::fmt::Debug;

    /// The device's state now.
    fn save(&self) -> Self::State;

    /// Puts the device in `state` (it was built with the same configuration).
    fn restore(&mut self, state: &Self::State) -> Result<(), StateError>;
}

/// The test every device's state passes: save, restore into a fresh device, save again:
/// both saves are equal, also after a trip through JSON.
#[cfg(test)]
pub fn assert_round_trip<D: Persist>(source: &D, fresh: &mut D) {
    let saved = source.save();
    let json = serde_json::to_string(&saved).expect("state serializes");
    let parsed: D::State = serde_json::from_str(&json).expect("state deserializes");
    assert_eq!(parsed, saved, "JSON round trip");
    fresh.restore(&parsed).expect("state restores");
    assert_eq!(fresh.save(), saved, "save -> restore -> save");
}
