//! Identifiers: UUID v7 newtypes for everything cairn creates, validated names for things that
//! the hypervisor names (nodes, disks).
//!
//! Ids are built from a timestamp and random bytes that the caller supplies
//! ([`JobId::new_v7`]), so this crate stays pure: nothing here reads a clock or an RNG.
//!
//! The binary encoding of every id is part of every event format version and is frozen:
//! a UUID id is its 16 raw bytes (postcard writes a `[u8; 16]` as 16 bytes), a name is a
//! postcard string. Human-readable serializers (JSON for the API) get the canonical text form
//! instead, the same text as [`Display`](std::fmt::Display) and [`FromStr`].
//! Decoding validates: a UUID id must be version 7, a name must match its character set.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Why a string or byte array is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The text is not a UUID at all.
    #[error("{kind} {value:?} is not a UUID")]
    NotUuid {
        /// Which id type was being parsed, e.g. `JobId`.
        kind: &'static str,
        /// The rejected input.
        value: String,
    },
    /// The UUID is well formed but not version 7 (cairn creates only v7 ids).
    #[error("{kind} {value} is a version {version} UUID, expected version 7")]
    NotV7 {
        /// Which id type was being parsed.
        kind: &'static str,
        /// The rejected UUID.
        value: String,
        /// The version number found.
        version: usize,
    },
    /// A name (node, disk) is longer than its type allows.
    #[error("{kind} is {len} bytes long, at most {max} are allowed")]
    TooLong {
        /// Which id type was being parsed.
        kind: &'static str,
        /// Length of the rejected input in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A name (node, disk) breaks its rules.
    #[error("{kind} {value:?} is invalid: {rule}")]
    BadName {
        /// Which id type was being parsed.
        kind: &'static str,
        /// The rejected input.
        value: String,
        /// The rule it breaks, in words.
        rule: &'static str,
    },
}

/// Unix time in milliseconds encoded in a v7 UUID's first 48 bits.
fn v7_unix_millis(uuid: &Uuid) -> u64 {
    let bytes = uuid.as_bytes();
    let mut millis = 0u64;
    for byte in &bytes[..6] {
        millis = (millis << 8) | u64::from(*byte);
    }
    millis
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Uuid);

        impl $name {
            /// Builds a v7 id from a Unix time in milliseconds and 10 random bytes, both
            /// supplied by the caller (its clock and RNG). Ids made later sort later.
            pub const fn new_v7(unix_millis: u64, rand: [u8; 10]) -> Self {
                Self(uuid::Builder::from_unix_timestamp_millis(unix_millis, &rand).into_uuid())
            }

            /// Wraps an existing UUID; fails unless it is version 7.
            pub fn from_uuid(uuid: Uuid) -> Result<Self, IdError> {
                match uuid.get_version_num() {
                    7 => Ok(Self(uuid)),
                    version => Err(IdError::NotV7 {
                        kind: stringify!($name),
                        value: uuid.to_string(),
                        version,
                    }),
                }
            }

            /// Wraps 16 raw bytes; fails unless they are a version 7 UUID.
            pub fn from_bytes(bytes: [u8; 16]) -> Result<Self, IdError> {
                Self::from_uuid(Uuid::from_bytes(bytes))
            }

            /// The 16 raw bytes (big-endian UUID layout; v7 ids sort by time).
            pub const fn as_bytes(&self) -> &[u8; 16] {
                self.0.as_bytes()
            }

            /// The underlying UUID.
            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }

            /// The Unix time in milliseconds at which the id was made.
            pub fn unix_millis(&self) -> u64 {
                v7_unix_millis(&self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0.hyphenated(), f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0.hyphenated())
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(text: &str) -> Result<Self, IdError> {
                let uuid = Uuid::try_parse(text).map_err(|_| IdError::NotUuid {
                    kind: stringify!($name),
                    value: text.to_owned(),
                })?;
                Self::from_uuid(uuid)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                if serializer.is_human_readable() {
                    serializer.collect_str(self)
                } else {
                    self.as_bytes().serialize(serializer)
                }
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                if deserializer.is_human_readable() {
                    let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                    text.parse().map_err(de::Error::custom)
                } else {
                    let bytes = <[u8; 16]>::deserialize(deserializer)?;
                    Self::from_bytes(bytes).map_err(de::Error::custom)
                }
            }
        }
    };
}

uuid_id!(
    /// A protection group: members (VMs) and a policy.
    GroupId
);
uuid_id!(
    /// A VM (data source). cairn assigns it when the VM is first discovered.
    VmId
);
uuid_id!(
    /// A job (backup, consistency check, recovery, ...).
    JobId
);
uuid_id!(
    /// One step of a job's plan (snapshot, transfer of one disk, ...). Attempts share the id.
    StepId
);
uuid_id!(
    /// One event in the log.
    EventId
);
uuid_id!(
    /// One command; a command id seen twice is processed once (idempotency).
    CommandId
);
uuid_id!(
    /// One recovery point of a VM (all its disks at one point in time).
    RecoveryPointId
);
uuid_id!(
    /// One API token (an identity with a role); its secret is never stored, only its hash.
    TokenId
);

/// Checks a name against `[A-Za-z0-9._-]{1,max_len}`, not starting with '.'.
fn check_name(kind: &'static str, value: &str, max_len: usize) -> Result<(), IdError> {
    let bad = |rule| IdError::BadName {
        kind,
        value: value.to_owned(),
        rule,
    };
    if value.is_empty() {
        return Err(bad("must not be empty"));
    }
    if value.len() > max_len {
        return Err(IdError::TooLong {
            kind,
            len: value.len(),
            max: max_len,
        });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad("only A-Z, a-z, 0-9, '.', '_' and '-' are allowed"));
    }
    if value.starts_with('.') {
        return Err(bad("must not start with '.'"));
    }
    Ok(())
}

macro_rules! name_id {
    ($(#[$doc:meta])* $name:ident, $max_len:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Longest accepted name, in bytes.
            pub const MAX_LEN: usize = $max_len;

            /// Validates and wraps a name.
            pub fn new(name: impl Into<String>) -> Result<Self, IdError> {
                let name = name.into();
                check_name(stringify!($name), &name, $max_len)?;
                Ok(Self(name))
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;

            fn try_from(name: String) -> Result<Self, IdError> {
                Self::new(name)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:?})"), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;

            fn from_str(text: &str) -> Result<Self, IdError> {
                Self::new(text)
            }
        }
    };
}

name_id!(
    /// A hypervisor node (and the worker on it), by name: `[A-Za-z0-9._-]{1,64}`, not starting
    /// with '.'. Names may contain '.', which NATS treats as a token separator: build subjects
    /// with [`crate::subjects`], which escapes it.
    NodeId,
    64
);
name_id!(
    /// A VM disk, by the name the hypervisor gives it (e.g. `virtio0`, `scsi0-0-0`):
    /// `[A-Za-z0-9._-]{1,128}`, not starting with '.' (so it is safe as a file name).
    DiskId,
    128
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v7_ids_round_trip_through_text_and_carry_their_time() {
        let id = JobId::new_v7(1_700_000_000_123, [7; 10]);
        assert_eq!(id.unix_millis(), 1_700_000_000_123);
        let text = id.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(text.parse::<JobId>().unwrap(), id);
        assert_eq!(format!("{id:?}"), format!("JobId({text})"));
    }

    #[test]
    fn ids_sort_by_time() {
        let early = EventId::new_v7(1_000, [0xff; 10]);
        let late = EventId::new_v7(1_001, [0; 10]);
        assert!(early < late);
    }

    #[test]
    fn non_v7_and_garbage_are_rejected() {
        let v4 = "9b2e4c4a-3f4e-4b8e-9d1a-2c3b4d5e6f70";
        assert!(matches!(
            v4.parse::<VmId>(),
            Err(IdError::NotV7 { version: 4, .. })
        ));
        assert!(matches!(
            "not-a-uuid".parse::<VmId>(),
            Err(IdError::NotUuid { kind: "VmId", .. })
        ));
        assert!(GroupId::from_bytes([0; 16]).is_err());
    }

    #[test]
    fn binary_encoding_is_16_raw_bytes() {
        let id = StepId::new_v7(42, [1; 10]);
        let bytes = postcard::to_allocvec(&id).unwrap();
        assert_eq!(bytes.as_slice(), id.as_bytes());
        assert_eq!(postcard::from_bytes::<StepId>(&bytes).unwrap(), id);
        // A non-v7 UUID in a message is rejected on decode, not passed on.
        assert!(postcard::from_bytes::<StepId>(&[0u8; 16]).is_err());
    }

    #[test]
    fn names_are_validated() {
        assert!(NodeId::new("kvm-01.example_net").is_ok());
        assert!(NodeId::new("a".repeat(64)).is_ok());
        assert!(NodeId::new("a".repeat(65)).is_err());
        assert!(NodeId::new("").is_err());
        assert!(NodeId::new("node one").is_err());
        assert!(NodeId::new(".hidden").is_err());
        assert!(NodeId::new("a/b").is_err());
        assert!(DiskId::new("d".repeat(128)).is_ok());
        assert!(DiskId::new("d".repeat(129)).is_err());
        assert!(DiskId::new("..").is_err());
        assert!(DiskId::new("scsi0-0-0").is_ok());
        let err = DiskId::new("ü").unwrap_err();
        assert!(err.to_string().contains("DiskId"), "{err}");
    }

    #[test]
    fn invalid_names_are_rejected_on_decode() {
        let bytes = postcard::to_allocvec("bad name").unwrap();
        assert!(postcard::from_bytes::<NodeId>(&bytes).is_err());
        let bytes = postcard::to_allocvec("good-name").unwrap();
        assert_eq!(
            postcard::from_bytes::<NodeId>(&bytes).unwrap().as_str(),
            "good-name"
        );
    }
}
