//! What every fuzz target checks besides "never panics": how a refusal reads, and that what
//! VirtNet writes, it reads back unchanged.

use std::fmt::{Debug, Display};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The accepted value, or `None` after checking that the refusal says what is wrong: an error
/// with an empty message leaves the user of the CNI config or annotation with nothing to fix.
pub fn accepted<T, E: Display>(outcome: Result<T, E>) -> Option<T> {
    match outcome {
        Ok(value) => Some(value),
        Err(error) => {
            assert!(
                !error.to_string().trim().is_empty(),
                "a refusal without a message"
            );
            None
        }
    }
}

/// Parses `bytes` as `T`, like the agent or a plugin reads a request or an answer, and, when
/// that succeeds, checks that serializing the value and parsing it again gives the same value.
pub fn json_round_trip<T>(bytes: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let Some(value) = accepted(serde_json::from_slice::<T>(bytes)) else {
        return;
    };
    let written = serde_json::to_vec(&value).expect("a parsed value serializes");
    let reread: T = serde_json::from_slice(&written).unwrap_or_else(|error| {
        panic!(
            "{value:?} serializes to {}, which does not parse: {error}",
            String::from_utf8_lossy(&written)
        )
    });
    assert_eq!(
        value, reread,
        "the round trip through JSON changed the value"
    );
}
