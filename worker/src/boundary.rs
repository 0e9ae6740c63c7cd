//! The node's boundary: what the control plane may ask this node's worker to read and write.
//!
//! The settings come from the node's own configuration (`[worker]` and `[repositories.NAME]`
//! in `cairn.toml`, or `cairn up`'s flags), never from a step:
//!
//! - **registered repositories** by name, each with its folder and whether it must be
//!   encrypted. Steps name a repository by its registered name; a step naming an absolute path
//!   equal to a registered repository's folder is taken as that repository (groups made before
//!   repositories had names). Anything else is refused before anything is touched;
//! - **recovery roots**: restores to new images, folder copies, item extraction and the images
//!   of a VM recovered on another host are written only below one of them;
//! - **app-owner roots**: the recovery roots where a recovery asked by an app-owner may write
//!   (each must lie below a recovery root; the control plane applies them to app-owner tokens);
//! - **seed roots**: seed imports read only there (and `cairn seed export` writes there);
//! - **image roots**: the disks a VM descriptor names must lie below one of them or below a
//!   recovery root (where VMs recovered on this node live), after resolving links; block
//!   devices only when `allow_block_devices` is set;
//! - **item limits**: the most a single item extraction may write; a request may ask for
//!   less, never for more.
//!
//! Pure: paths are checked lexically here; the writes themselves go through [`crate::safefs`]
//! from the root's descriptor, so the kernel keeps them below it.
//!
//! Must not: touch the file system (besides [`NodeSettings::image_disk_allowed`], which
//! resolves a disk's links to compare it with the image roots).

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use crate::items::Limits;

/// Whether a registered repository must be encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encryption {
    /// Encrypted with the node's key; a plain repository at its folder is refused.
    Required,
    /// Plain (or encrypted: the config says which).
    None,
}

impl Encryption {
    /// The word used in `cairn.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encryption::Required => "required",
            Encryption::None => "none",
        }
    }
}

/// A repository the node's settings register under a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisteredRepository {
    /// Its folder (absolute).
    pub path: PathBuf,
    /// Whether it must be encrypted.
    pub encryption: Encryption,
}

/// The kinds of roots, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootKind {
    /// Recovery roots.
    Recovery,
    /// Seed roots.
    Seed,
    /// Image roots.
    Image,
}

impl RootKind {
    fn word(self) -> &'static str {
        match self {
            RootKind::Recovery => "recovery",
            RootKind::Seed => "seed",
            RootKind::Image => "image",
        }
    }
}

/// Why the boundary refuses something.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A target outside every root of its kind.
    #[error("outside the node's {} roots: {}", kind.word(), path.display())]
    Outside {
        /// Which roots.
        kind: RootKind,
        /// The refused path.
        path: PathBuf,
    },
    /// A target path that is not absolute and plain.
    #[error("{}: {reason}", path.display())]
    BadPath {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// A repository the node does not register.
    #[error(
        "repository {name:?} is not registered on this node (registered: {})",
        if known.is_empty() { "none".to_string() } else { known.join(", ") }
    )]
    UnknownRepository {
        /// The name (or path) the step gave.
        name: String,
        /// The names this node registers.
        known: Vec<String>,
    },
    /// The settings themselves are wrong.
    #[error("node settings: {what}: {reason}")]
    Invalid {
        /// Which setting.
        what: String,
        /// What is wrong.
        reason: String,
    },
}

/// What a node lets its worker do. Build it, then call [`NodeSettings::validate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSettings {
    /// Registered repositories by name.
    pub repositories: BTreeMap<String, RegisteredRepository>,
    /// Where recoveries may write.
    pub recovery_roots: Vec<PathBuf>,
    /// Where recoveries asked by app-owners may write (each below a recovery root).
    pub app_owner_roots: Vec<PathBuf>,
    /// Where seed imports read from.
    pub seed_roots: Vec<PathBuf>,
    /// Where VM descriptors' disks may be.
    pub image_roots: Vec<PathBuf>,
    /// Whether descriptor disks may be block devices.
    pub allow_block_devices: bool,
    /// The most one item extraction may write.
    pub item_limits: Limits,
}

impl Default for NodeSettings {
    /// Nothing registered, no roots: a worker that may back up nothing and write nowhere.
    fn default() -> NodeSettings {
        NodeSettings {
            repositories: BTreeMap::new(),
            recovery_roots: Vec::new(),
            app_owner_roots: Vec::new(),
            seed_roots: Vec::new(),
            image_roots: Vec::new(),
            allow_block_devices: false,
            item_limits: Limits::default(),
        }
    }
}

/// Longest repository name.
pub const MAX_REPOSITORY_NAME: usize = 64;

/// Checks a repository name: `[A-Za-z0-9._-]{1,64}`, not starting with '.'.
pub fn check_repository_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_REPOSITORY_NAME {
        return Err(format!(
            "{name:?}: a repository name has 1 to {MAX_REPOSITORY_NAME} characters"
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        || name.starts_with('.')
    {
        return Err(format!(
            "{name:?}: a repository name has only A-Z, a-z, 0-9, '.', '_' and '-', and does not \
             start with '.'"
        ));
    }
    Ok(())
}

/// Whether `name` may be one path component that cairn makes from a VM name or disk id:
/// `[A-Za-z0-9._-]`, 1 to 255 bytes, not starting with '.'.
pub fn is_safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks that `path` is absolute and made of plain names (no `.` or `..`).
pub fn check_plain_absolute(path: &Path) -> Result<(), Error> {
    if !path.is_absolute() {
        return Err(Error::BadPath {
            path: path.to_path_buf(),
            reason: "not an absolute path",
        });
    }
    for component in path.components() {
        match component {
            Component::RootDir | Component::Normal(_) => {}
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::BadPath {
                    path: path.to_path_buf(),
                    reason: "contains `.` or `..`",
                });
            }
        }
    }
    // `Path::components` drops a `.` in the middle; the bytes do not.
    let text = path.as_os_str().as_encoded_bytes();
    if text.windows(3).any(|w| w == b"/./") || text.ends_with(b"/.") {
        return Err(Error::BadPath {
            path: path.to_path_buf(),
            reason: "contains `.` or `..`",
        });
    }
    Ok(())
}

/// A path below one of the roots: the root and the path relative to it (empty for the root
/// itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BelowRoot {
    /// The root.
    pub root: PathBuf,
    /// The rest (plain names only).
    pub rel: PathBuf,
}

impl NodeSettings {
    /// These settings with repository `name` registered at `path`.
    pub fn with_repository(
        mut self,
        name: &str,
        path: impl Into<PathBuf>,
        encryption: Encryption,
    ) -> NodeSettings {
        self.repositories.insert(
            name.to_owned(),
            RegisteredRepository {
                path: path.into(),
                encryption,
            },
        );
        self
    }

    /// Checks the settings: valid repository names, absolute plain paths, no repository
    /// registered twice at one folder, every app-owner root below a recovery root.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |what: String, reason: String| Error::Invalid { what, reason };
        let mut folders: BTreeMap<&Path, &str> = BTreeMap::new();
        for (name, repo) in &self.repositories {
            check_repository_name(name)
                .map_err(|reason| invalid(format!("repositories.{name}"), reason))?;
            check_plain_absolute(&repo.path)
                .map_err(|e| invalid(format!("repositories.{name}.path"), e.to_string()))?;
            if let Some(other) = folders.insert(&repo.path, name) {
                return Err(invalid(
                    format!("repositories.{name}.path"),
                    format!(
                        "{} is already registered as repository {other}",
                        repo.path.display()
                    ),
                ));
            }
        }
        for (what, roots) in [
            ("recovery_roots", &self.recovery_roots),
            ("app_owner_roots", &self.app_owner_roots),
            ("seed_roots", &self.seed_roots),
            ("image_roots", &self.image_roots),
        ] {
            for root in roots {
                check_plain_absolute(root).map_err(|e| invalid(what.into(), e.to_string()))?;
                if root == Path::new("/") {
                    return Err(invalid(
                        what.into(),
                        "/ is not a root: name the folders cairn may use".into(),
                    ));
                }
            }
        }
        for root in &self.app_owner_roots {
            if !self.recovery_roots.iter().any(|r| root.starts_with(r)) {
                return Err(invalid(
                    "app_owner_roots".into(),
                    format!("{} is not below a recovery root", root.display()),
                ));
            }
        }
        let limits = &self.item_limits;
        if limits.max_entries == 0
            || limits.max_total_bytes == 0
            || limits.max_file_bytes == 0
            || limits.max_depth == 0
            || limits.max_dir_entries == 0
        {
            return Err(invalid(
                "item limits".into(),
                "every limit must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// The registered repository a step names: by name, or by the folder of a registered
    /// repository (an absolute path equal to it). Returns its name too.
    pub fn repository(&self, named: &str) -> Result<(&str, &RegisteredRepository), Error> {
        if let Some((name, repo)) = self.repositories.get_key_value(named) {
            return Ok((name, repo));
        }
        let path = Path::new(named);
        if path.is_absolute()
            && let Some((name, repo)) = self.repositories.iter().find(|(_, r)| r.path == path)
        {
            return Ok((name, repo));
        }
        Err(Error::UnknownRepository {
            name: named.to_owned(),
            known: self.repositories.keys().cloned().collect(),
        })
    }

    fn roots(&self, kind: RootKind) -> &[PathBuf] {
        match kind {
            RootKind::Recovery => &self.recovery_roots,
            RootKind::Seed => &self.seed_roots,
            RootKind::Image => &self.image_roots,
        }
    }

    /// The root of `kind` that `path` lies below (the deepest one), and the rest of the path.
    /// Lexical: the writes resolve the rest from the root's descriptor.
    pub fn below(&self, kind: RootKind, path: &Path) -> Result<BelowRoot, Error> {
        check_plain_absolute(path)?;
        self.roots(kind)
            .iter()
            .filter(|root| path.starts_with(root))
            .max_by_key(|root| root.components().count())
            .map(|root| BelowRoot {
                root: root.clone(),
                rel: path.strip_prefix(root).expect("starts_with").to_path_buf(),
            })
            .ok_or_else(|| Error::Outside {
                kind,
                path: path.to_path_buf(),
            })
    }

    /// Whether a descriptor's disk may be read: a file below an image root or a recovery root
    /// (links resolved on both sides), or a block device when they are allowed. `Err` says why
    /// not.
    pub fn image_disk_allowed(&self, disk: &Path) -> Result<(), String> {
        use std::os::unix::fs::FileTypeExt;
        let real = disk
            .canonicalize()
            .map_err(|e| format!("{}: {e}", disk.display()))?;
        let meta = std::fs::metadata(&real).map_err(|e| format!("{}: {e}", disk.display()))?;
        if meta.file_type().is_block_device() {
            return if self.allow_block_devices {
                Ok(())
            } else {
                Err(format!(
                    "{} is a block device and this node does not allow them \
                     (allow_block_devices)",
                    disk.display()
                ))
            };
        }
        // A VM recovered on this node has its images below a recovery root.
        let inside = self
            .image_roots
            .iter()
            .chain(&self.recovery_roots)
            .any(|root| root.canonicalize().is_ok_and(|root| real.starts_with(root)));
        if inside {
            Ok(())
        } else {
            Err(Error::Outside {
                kind: RootKind::Image,
                path: disk.to_path_buf(),
            }
            .to_string())
        }
    }

    /// The limits of one extraction: what the request asks for, each capped by the node's.
    pub fn item_limits(&self, requested: Option<&Limits>) -> Limits {
        let node = &self.item_limits;
        match requested {
            None => *node,
            Some(asked) => Limits {
                max_entries: asked.max_entries.min(node.max_entries),
                max_total_bytes: asked.max_total_bytes.min(node.max_total_bytes),
                max_file_bytes: asked.max_file_bytes.min(node.max_file_bytes),
                max_depth: asked.max_depth.min(node.max_depth),
                max_dir_entries: asked.max_dir_entries.min(node.max_dir_entries),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> NodeSettings {
        let mut s = NodeSettings {
            recovery_roots: vec!["/srv/recovered".into(), "/srv/recovered/deep".into()],
            app_owner_roots: vec!["/srv/recovered/apps".into()],
            seed_roots: vec!["/media/seeds".into()],
            image_roots: vec!["/var/lib/images".into()],
            ..NodeSettings::default()
        };
        s.repositories.insert(
            "default".into(),
            RegisteredRepository {
                path: "/backup/repo".into(),
                encryption: Encryption::Required,
            },
        );
        s
    }

    #[test]
    fn valid_settings_pass() {
        settings().validate().unwrap();
        NodeSettings::default().validate().unwrap();
    }

    #[test]
    fn bad_settings_are_named() {
        type Change = Box<dyn Fn(&mut NodeSettings)>;
        let cases: Vec<(Change, &str)> = vec![
            (
                Box::new(|s| {
                    s.repositories.insert(
                        ".hidden".into(),
                        RegisteredRepository {
                            path: "/x".into(),
                            encryption: Encryption::None,
                        },
                    );
                }),
                "repositories..hidden",
            ),
            (
                Box::new(|s| {
                    s.repositories.insert(
                        "other".into(),
                        RegisteredRepository {
                            path: "/backup/repo".into(),
                            encryption: Encryption::None,
                        },
                    );
                }),
                "already registered as repository default",
            ),
            (
                Box::new(|s| s.recovery_roots.push("relative/dir".into())),
                "not an absolute path",
            ),
            (
                Box::new(|s| s.seed_roots.push("/a/../b".into())),
                "contains `.` or `..`",
            ),
            (
                Box::new(|s| s.image_roots.push("/".into())),
                "/ is not a root",
            ),
            (
                Box::new(|s| s.app_owner_roots.push("/elsewhere".into())),
                "/elsewhere is not below a recovery root",
            ),
            (Box::new(|s| s.item_limits.max_depth = 0), "at least 1"),
        ];
        for (change, expected) in cases {
            let mut s = settings();
            change(&mut s);
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(expected), "{err:?} lacks {expected:?}");
        }
    }

    #[test]
    fn repositories_resolve_by_name_or_registered_path() {
        let s = settings();
        assert_eq!(s.repository("default").unwrap().0, "default");
        assert_eq!(s.repository("/backup/repo").unwrap().0, "default");
        assert_eq!(s.repository("/backup/repo/").unwrap().0, "default");
        for bad in ["other", "/backup", "/backup/repo/sub", "backup/repo", ""] {
            let err = s.repository(bad).unwrap_err();
            assert!(
                matches!(&err, Error::UnknownRepository { name, .. } if name == bad),
                "{bad}: {err}"
            );
            assert!(err.to_string().contains("registered: default"), "{err}");
        }
    }

    #[test]
    fn targets_must_lie_below_a_root() {
        let s = settings();
        let below = s
            .below(RootKind::Recovery, Path::new("/srv/recovered/deep/a/b.raw"))
            .unwrap();
        assert_eq!(below.root, Path::new("/srv/recovered/deep"));
        assert_eq!(below.rel, Path::new("a/b.raw"));
        let root = s
            .below(RootKind::Recovery, Path::new("/srv/recovered"))
            .unwrap();
        assert_eq!(root.rel, Path::new(""));
        for (path, expected) in [
            (
                "/srv/recovered-not",
                "outside the node's recovery roots: /srv/recovered-not",
            ),
            (
                "/tmp/restored",
                "outside the node's recovery roots: /tmp/restored",
            ),
            ("/srv/recovered/../etc", "contains `.` or `..`"),
            ("/srv/recovered/./x", "contains `.` or `..`"),
            ("srv/recovered/x", "not an absolute path"),
        ] {
            let err = s.below(RootKind::Recovery, Path::new(path)).unwrap_err();
            assert!(err.to_string().contains(expected), "{path}: {err}");
        }
        let err = s
            .below(RootKind::Seed, Path::new("/srv/recovered/x"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "outside the node's seed roots: /srv/recovered/x"
        );
    }

    #[test]
    fn safe_file_names() {
        for good in ["web01-disk0.qcow2", "db_01.data.raw", "A-1"] {
            assert!(is_safe_file_name(good), "{good}");
        }
        for bad in [
            "",
            ".hidden",
            "a/b",
            "..",
            "web 01",
            "x\u{e9}",
            &"a".repeat(256),
        ] {
            assert!(!is_safe_file_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn requested_item_limits_are_capped_by_the_node() {
        let mut s = settings();
        s.item_limits.max_entries = 100;
        s.item_limits.max_depth = 8;
        let asked = Limits {
            max_entries: 1_000,
            max_depth: 4,
            ..Limits::default()
        };
        let limits = s.item_limits(Some(&asked));
        assert_eq!(limits.max_entries, 100);
        assert_eq!(limits.max_depth, 4);
        assert_eq!(s.item_limits(None).max_entries, 100);
    }

    #[test]
    fn image_disks_must_lie_below_an_image_root() {
        let images = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(images.path().join("in.raw"), b"").unwrap();
        std::fs::write(outside.path().join("out.raw"), b"").unwrap();
        std::os::unix::fs::symlink(
            outside.path().join("out.raw"),
            images.path().join("link.raw"),
        )
        .unwrap();
        let s = NodeSettings {
            image_roots: vec![images.path().to_path_buf()],
            ..NodeSettings::default()
        };
        s.image_disk_allowed(&images.path().join("in.raw")).unwrap();
        let err = s
            .image_disk_allowed(&outside.path().join("out.raw"))
            .unwrap_err();
        assert!(err.contains("outside the node's image roots"), "{err}");
        // A link inside the root to a file outside it is outside.
        let err = s
            .image_disk_allowed(&images.path().join("link.raw"))
            .unwrap_err();
        assert!(err.contains("outside the node's image roots"), "{err}");
    }
}
