//! The extraction walk's decisions about folders, apart from any IO: enter a folder, or skip
//! it because it is one of its own ancestors (a loop), because it was already extracted under
//! another name (a directory hard link, cross-linked FAT clusters), or because it lies deeper
//! than the depth limit. A skipped folder is reported by the caller and the walk goes on with
//! its siblings, so one hostile folder never costs the rest of the extraction.
//!
//! Folders are told apart by their [`NodeId`] within one volume; the set of entered folders
//! belongs to one extracted item (items the caller names explicitly are each extracted, even
//! when one lies inside another). This module neither reads the image nor writes the target.

use std::collections::HashMap;

use super::NodeId;

/// What the walk does with a folder it reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Folder {
    /// Create it and extract what it holds.
    Enter,
    /// The folder is an ancestor of itself on this path: entering it would walk the same tree
    /// again and again.
    Loop { id: NodeId, at: String },
    /// The folder was already extracted, at `at`, under another name.
    Again { id: NodeId, at: String },
    /// The folder lies deeper than `limit` folders.
    TooDeep { limit: u32 },
}

impl Folder {
    /// Why the folder is skipped, for the extraction report; `None` for [`Folder::Enter`].
    pub(super) fn skip_reason(&self) -> Option<String> {
        match self {
            Folder::Enter => None,
            Folder::Loop { id, at } => {
                Some(format!("directory loop: {id} is already extracted at {at}"))
            }
            Folder::Again { id, at } => Some(format!(
                "{}: {id} is already extracted at {at}",
                id.second_name()
            )),
            Folder::TooDeep { limit } => Some(format!(
                "deeper than {limit} folders (the depth limit): skipped with everything in it"
            )),
        }
    }
}

/// The folders entered so far while extracting one item: where each was extracted, by id
/// (several places for an inexact id, which distinct folders may share).
#[derive(Debug, Default)]
pub(super) struct Visited {
    at: HashMap<NodeId, Vec<String>>,
}

/// Whether `path` lies below `ancestor` (both as the walk shows them, `/p2/a/b`).
fn is_below(path: &str, ancestor: &str) -> bool {
    path.strip_prefix(ancestor)
        .is_some_and(|rest| rest.starts_with('/'))
}

impl Visited {
    /// What to do with the folder shown as `shown`, `depth` folders below the item (the item
    /// itself is at 0), whose identity is `id` (`None` when the file system cannot tell; such
    /// a folder is bounded by the depth limit alone).
    pub(super) fn decide(
        &self,
        shown: &str,
        id: Option<NodeId>,
        depth: usize,
        max_depth: u32,
    ) -> Folder {
        if let Some(id) = id
            && let Some(places) = self.at.get(&id)
        {
            if let Some(at) = places.iter().find(|at| is_below(shown, at)) {
                return Folder::Loop { id, at: at.clone() };
            }
            if id.is_exact() {
                return Folder::Again {
                    id,
                    at: places[0].clone(),
                };
            }
        }
        if depth >= max_depth as usize {
            return Folder::TooDeep { limit: max_depth };
        }
        Folder::Enter
    }

    /// Records that the folder shown as `shown` was entered (created in the target).
    pub(super) fn entered(&mut self, shown: &str, id: Option<NodeId>) {
        if let Some(id) = id {
            let places = self.at.entry(id).or_default();
            // An exact id is entered once; the first place is the one reports name.
            if places.is_empty() || !id.is_exact() {
                places.push(shown.to_string());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn visited(entries: &[(&str, NodeId)]) -> Visited {
        let mut v = Visited::default();
        for &(path, id) in entries {
            v.entered(path, Some(id));
        }
        v
    }

    #[test]
    fn folders_are_entered_once_and_within_the_depth_limit() {
        use NodeId::*;
        let v = visited(&[
            ("/p2", NtfsRecord(2)),
            ("/p2/a", NtfsRecord(12)),
            ("/p2/ab", NtfsRecord(13)),
        ]);
        let loop_at = |id, at: &str| Folder::Loop {
            id,
            at: at.to_string(),
        };
        let again_at = |id, at: &str| Folder::Again {
            id,
            at: at.to_string(),
        };
        let cases: &[(&str, Option<NodeId>, usize, u32, Folder)] = &[
            ("/p2/b", Some(NtfsRecord(14)), 1, 128, Folder::Enter),
            (
                "/p2/a/self",
                Some(NtfsRecord(12)),
                2,
                128,
                loop_at(NtfsRecord(12), "/p2/a"),
            ),
            (
                "/p2/a/up",
                Some(NtfsRecord(2)),
                2,
                128,
                loop_at(NtfsRecord(2), "/p2"),
            ),
            // A second name beside the first one, not below it: a hard link, no loop.
            (
                "/p2/link",
                Some(NtfsRecord(12)),
                1,
                128,
                again_at(NtfsRecord(12), "/p2/a"),
            ),
            // `/p2/ab/x` is not below `/p2/a` although its text starts with it.
            (
                "/p2/ab/x",
                Some(NtfsRecord(12)),
                2,
                128,
                again_at(NtfsRecord(12), "/p2/a"),
            ),
            (
                "/p2/ab/x",
                Some(NtfsRecord(13)),
                2,
                128,
                loop_at(NtfsRecord(13), "/p2/ab"),
            ),
            // Ids of different kinds never match.
            ("/p2/c", Some(Ext4Look(12)), 1, 128, Folder::Enter),
            ("/p2/c", Some(FatData(12)), 1, 128, Folder::Enter),
            // The depth limit: the item is at 0, so 8 allows depths 0 to 7.
            ("/p2/d", None, 7, 8, Folder::Enter),
            ("/p2/d", None, 8, 8, Folder::TooDeep { limit: 8 }),
            (
                "/p2/d",
                Some(NtfsRecord(99)),
                9,
                8,
                Folder::TooDeep { limit: 8 },
            ),
            ("/p2", None, 0, 0, Folder::TooDeep { limit: 0 }),
            // A loop is named as one even past the limit.
            (
                "/p2/a/self",
                Some(NtfsRecord(12)),
                200,
                8,
                loop_at(NtfsRecord(12), "/p2/a"),
            ),
            // Without an id only the depth limit applies.
            ("/p2/a/self", None, 2, 128, Folder::Enter),
        ];
        for (shown, id, depth, max, want) in cases {
            assert_eq!(
                &v.decide(shown, *id, *depth, *max),
                want,
                "{shown} {id:?} at {depth}"
            );
        }
    }

    #[test]
    fn a_look_alike_ext4_folder_is_a_loop_only_below_its_twin() {
        let twin = NodeId::Ext4Look(7);
        let mut v = Visited::default();
        v.entered("/p2/a", Some(twin));
        // Elsewhere, a folder that looks the same is extracted: it may be another folder.
        assert_eq!(v.decide("/p2/b", Some(twin), 1, 128), Folder::Enter);
        v.entered("/p2/b", Some(twin));
        // Below either place, it is a loop.
        for (shown, at) in [("/p2/a/self", "/p2/a"), ("/p2/b/x/up", "/p2/b")] {
            assert_eq!(
                v.decide(shown, Some(twin), 2, 128),
                Folder::Loop {
                    id: twin,
                    at: at.into()
                }
            );
        }
        assert!(
            Folder::Loop {
                id: twin,
                at: "/p2/a".into()
            }
            .skip_reason()
            .unwrap()
            .contains("same inode metadata and entries")
        );
    }

    #[test]
    fn the_first_place_a_folder_was_extracted_is_kept() {
        let mut v = Visited::default();
        v.entered("/p2/a", Some(NodeId::NtfsRecord(5)));
        v.entered("/p2/b", Some(NodeId::NtfsRecord(5)));
        v.entered("/p2/c", None);
        assert_eq!(
            v.decide("/p2/b/x", Some(NodeId::NtfsRecord(5)), 2, 128),
            Folder::Again {
                id: NodeId::NtfsRecord(5),
                at: "/p2/a".into()
            }
        );
    }

    #[test]
    fn reasons_name_the_folder_and_where_it_came_out() {
        let reason = |f: Folder| f.skip_reason().unwrap();
        assert_eq!(
            reason(Folder::Loop {
                id: NodeId::NtfsRecord(14),
                at: "/p2/a".into()
            }),
            "directory loop: file record 14 is already extracted at /p2/a"
        );
        assert_eq!(
            reason(Folder::Again {
                id: NodeId::NtfsRecord(12),
                at: "/p2/a".into()
            }),
            "directory hard link: file record 12 is already extracted at /p2/a"
        );
        assert_eq!(
            reason(Folder::Again {
                id: NodeId::FatData(20480),
                at: "/p1/x".into()
            }),
            "cross-linked folder: the folder whose data starts at byte 20480 is already \
             extracted at /p1/x"
        );
        assert_eq!(
            reason(Folder::TooDeep { limit: 128 }),
            "deeper than 128 folders (the depth limit): skipped with everything in it"
        );
        assert_eq!(Folder::Enter.skip_reason(), None);
    }
}
