//! What an app owner's lists hold: only the VMs of its scope, the groups of its scope, and
//! what concerns them (their jobs, alerts, nodes and events). Every other principal sees
//! every entry. Pure filters over the views.

use std::collections::HashSet;

use crate::auth::Principal;
use crate::views::{AlertView, EventView, GroupView, JobView, NodeView, VmView};

pub(super) fn vms(caller: &Principal, vms: Vec<VmView>) -> Vec<VmView> {
    if caller.scope.is_none() {
        return vms;
    }
    vms.into_iter()
        .filter(|vm| caller.sees_vm_text(&vm.vm))
        .collect()
}

pub(super) fn groups(caller: &Principal, groups: Vec<GroupView>) -> Vec<GroupView> {
    if caller.scope.is_none() {
        return groups;
    }
    groups
        .into_iter()
        .filter(|g| g.group.parse().is_ok_and(|id| caller.sees_group(&id)))
        .collect()
}

/// The nodes that run a VM of the scope.
pub(super) fn nodes(caller: &Principal, nodes: Vec<NodeView>, vms: &[VmView]) -> Vec<NodeView> {
    if caller.scope.is_none() {
        return nodes;
    }
    let wanted: HashSet<&str> = vms
        .iter()
        .filter(|vm| caller.sees_vm_text(&vm.vm))
        .map(|vm| vm.node.as_str())
        .collect();
    nodes
        .into_iter()
        .filter(|n| wanted.contains(n.node.as_str()))
        .collect()
}

/// Alerts about a VM of the scope (repository alerts are the administrators').
pub(super) fn alerts(caller: &Principal, alerts: Vec<AlertView>) -> Vec<AlertView> {
    if caller.scope.is_none() {
        return alerts;
    }
    alerts
        .into_iter()
        .filter(|a| caller.sees_vm_text(&a.subject))
        .collect()
}

/// Events of the scope's VMs, groups and their jobs; `jobs` is asked only for app owners.
pub(super) fn events(
    caller: &Principal,
    events: Vec<EventView>,
    jobs: impl FnOnce() -> Vec<JobView>,
) -> Vec<EventView> {
    if caller.scope.is_none() {
        return events;
    }
    let scoped_jobs: HashSet<String> = jobs()
        .into_iter()
        .filter(|j| caller.sees_vm_text(&j.vm))
        .map(|j| j.job)
        .collect();
    events
        .into_iter()
        .filter(|e| match e.aggregate.split_once('/') {
            Some(("vm", id)) => caller.sees_vm_text(id),
            Some(("group", id)) => id.parse().is_ok_and(|g| caller.sees_group(&g)),
            Some(("job", id)) => scoped_jobs.contains(id),
            _ => false,
        })
        .collect()
}

/// An app owner recovers to the original VM, or writes files only below one of the app-owner
/// roots its VM's node reported (the worker checks its roots again before it writes).
pub(super) fn check_recovery_target(
    caller: &Principal,
    control: &dyn crate::control::Control,
    target: &cairn_schemas::RecoveryTarget,
) -> Result<(), super::Error> {
    use cairn_schemas::RecoveryTarget;
    if caller.scope.is_none() {
        return Ok(());
    }
    let (node, path) = match target {
        RecoveryTarget::OriginalVm => return Ok(()),
        RecoveryTarget::AlternateHost { .. } => {
            return Err(super::Error::Forbidden {
                right: crate::auth::Right::Recover.as_str(),
                message: "an app-owner token recovers to the original VM or to a folder under \
                          its node's app-owner roots, not to another host"
                    .into(),
            });
        }
        RecoveryTarget::CopyToFolder { node, path }
        | RecoveryTarget::ItemLevel { node, path, .. } => (node, path),
    };
    let roots = control.app_owner_roots(node);
    if roots.iter().any(|root| is_below(path, root)) {
        return Ok(());
    }
    let listed = if roots.is_empty() {
        "it has none".to_string()
    } else {
        roots.join(", ")
    };
    Err(super::Error::Forbidden {
        right: crate::auth::Right::Recover.as_str(),
        message: format!(
            "an app-owner token writes only below node {node}'s app-owner roots ({listed}); \
             {path} is not"
        ),
    })
}

/// Whether `path` is `root` or below it, component by component; both must be absolute,
/// and a `..` anywhere in `path` makes it not below anything.
pub(crate) fn is_below(path: &str, root: &str) -> bool {
    let path = std::path::Path::new(path);
    let root = std::path::Path::new(root);
    root.is_absolute()
        && path
            .components()
            .all(|c| c != std::path::Component::ParentDir)
        && path.starts_with(root)
}

#[cfg(test)]
mod tests {
    use super::is_below;

    #[test]
    fn below_a_root_is_by_whole_components() {
        assert!(is_below("/srv/owners/web", "/srv/owners"));
        assert!(is_below("/srv/owners", "/srv/owners/"));
        assert!(!is_below("/srv/ownersX/web", "/srv/owners"));
        assert!(!is_below("/srv", "/srv/owners"));
        assert!(!is_below("/srv/owners", "relative"));
        assert!(!is_below("/srv/owners/../../etc", "/srv/owners"));
    }
}
