//! The value of a partition lease in KV `CAIRN_LEASES` (`partition.<p>`): which orchestrator
//! instance owns the partition and at which epoch. Encoding and validation only; taking,
//! renewing and watching leases is the lease module's job, reading them to fence steps the
//! worker bus's.
//!
//! The value is JSON (`{"instance":"orch-1","epoch":42}`), so an operator can read it with
//! `nats kv get`. Decoding accepts unknown extra fields (newer writers) and refuses anything
//! else that is not exactly such an object.

use serde::{Deserialize, Serialize};

use super::Error;

/// Longest accepted instance id.
const MAX_INSTANCE_LEN: usize = 128;
/// Longest accepted encoded value.
const MAX_VALUE_LEN: usize = 1024;

/// Who owns a partition, at which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseValue {
    /// The owning orchestrator instance.
    pub instance: String,
    /// The owner's epoch: steps and events of earlier epochs are fenced off.
    pub epoch: u64,
}

impl LeaseValue {
    /// The bytes stored in the bucket.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a lease value always serializes")
    }

    /// Decodes and validates a stored value.
    pub fn decode(bytes: &[u8]) -> Result<LeaseValue, Error> {
        let bad = |reason: String| Error::BadValue {
            what: "partition lease value",
            reason,
        };
        if bytes.len() > MAX_VALUE_LEN {
            return Err(bad(format!(
                "{} bytes (at most {MAX_VALUE_LEN})",
                bytes.len()
            )));
        }
        let value: LeaseValue = serde_json::from_slice(bytes).map_err(|e| {
            bad(format!(
                "{e} in {:?}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(80)])
            ))
        })?;
        if value.instance.is_empty() || value.instance.len() > MAX_INSTANCE_LEN {
            return Err(bad(format!(
                "instance id must have 1 to {MAX_INSTANCE_LEN} bytes, not {}",
                value.instance.len()
            )));
        }
        if value.instance.chars().any(char::is_control) {
            return Err(bad(format!(
                "instance id {:?} contains control characters",
                value.instance
            )));
        }
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let value = LeaseValue {
            instance: "orch-1".into(),
            epoch: 42,
        };
        let bytes = value.encode();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"instance":"orch-1","epoch":42}"#
        );
        assert_eq!(LeaseValue::decode(&bytes).unwrap(), value);
        // A newer writer's extra field is accepted.
        assert_eq!(
            LeaseValue::decode(br#"{"instance":"orch-1","epoch":42,"since":7}"#).unwrap(),
            value
        );
        for bad in [
            &b""[..],
            b"null",
            b"{\"instance\":\"\",\"epoch\":1}",
            b"{\"instance\":\"a\"}",
            b"{\"instance\":\"a\",\"epoch\":-1}",
            b"{\"instance\":\"a\\u0000b\",\"epoch\":1}",
            b"\xff\xfe",
        ] {
            let err = LeaseValue::decode(bad).unwrap_err();
            assert!(
                err.to_string().starts_with("bad partition lease value"),
                "{err}"
            );
        }
        let long = format!(r#"{{"instance":"{}","epoch":1}}"#, "x".repeat(200));
        assert!(LeaseValue::decode(long.as_bytes()).is_err());
    }
}
