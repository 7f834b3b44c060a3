//! Least privilege: started as root (without systemd's `User=`), bartleby binds its ports first and
//! then becomes the configured `user`/`group` before it touches the spool or the network.
//! This runs before the async runtime starts, so no other thread keeps root's credentials.

use std::ffi::CString;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("user `{0}` does not exist")]
    NoUser(String),
    #[error("group `{0}` does not exist")]
    NoGroup(String),
    #[error("cannot prepare {path}: {source}")]
    Spool { path: String, source: std::io::Error },
    #[error("cannot change to user `{user}`: {source}")]
    Switch { user: String, source: std::io::Error },
}

/// Who we become.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// Looks up a user's uid and primary gid in the system's user database (NSS).
pub fn lookup_user(name: &str) -> Result<Identity, PrivilegeError> {
    let cname = CString::new(name).map_err(|_| PrivilegeError::NoUser(name.to_string()))?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer refers to memory owned by this frame and sized as passed.
    let rc = unsafe { libc::getpwnam_r(cname.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return Err(PrivilegeError::NoUser(name.to_string()));
    }
    Ok(Identity { uid: pwd.pw_uid, gid: pwd.pw_gid })
}

/// Looks up a group's gid.
pub fn lookup_group(name: &str) -> Result<u32, PrivilegeError> {
    let cname = CString::new(name).map_err(|_| PrivilegeError::NoGroup(name.to_string()))?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in lookup_user.
    let rc = unsafe { libc::getgrnam_r(cname.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return Err(PrivilegeError::NoGroup(name.to_string()));
    }
    Ok(grp.gr_gid)
}

/// If we run as root and a `user` is configured: makes sure the spool directory exists and belongs
/// to that user, then switches groups, gid and uid for good. Returns who we became.
pub fn drop_to(user: Option<&str>, group: Option<&str>, spool: &Path) -> Result<Option<Identity>, PrivilegeError> {
    let Some(user) = user else {
        if rustix::process::geteuid().is_root() {
            tracing::warn!("running as root: set `user` (and `group`) in the configuration to drop privileges");
        }
        return Ok(None);
    };
    if !rustix::process::geteuid().is_root() {
        return Ok(None);
    }
    let mut identity = lookup_user(user)?;
    if let Some(group) = group {
        identity.gid = lookup_group(group)?;
    }
    prepare_spool(spool, identity)?;
    let switch_err = |source| PrivilegeError::Switch { user: user.to_string(), source };
    // SAFETY: plain syscalls on integers; no threads exist yet (see the module comment).
    unsafe {
        if libc::setgroups(1, &identity.gid) != 0 || libc::setgid(identity.gid) != 0 {
            return Err(switch_err(std::io::Error::last_os_error()));
        }
        if libc::setuid(identity.uid) != 0 {
            return Err(switch_err(std::io::Error::last_os_error()));
        }
        if libc::setuid(0) == 0 {
            return Err(switch_err(std::io::Error::other("could still regain root")));
        }
    }
    tracing::info!(user, uid = identity.uid, gid = identity.gid, "dropped privileges");
    Ok(Some(identity))
}

fn prepare_spool(spool: &Path, identity: Identity) -> Result<(), PrivilegeError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| PrivilegeError::Spool { path: spool.display().to_string(), source };
    if !spool.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(spool).map_err(err)?;
        std::os::unix::fs::chown(spool, Some(identity.uid), Some(identity.gid)).map_err(err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_and_missing_names() {
        assert_eq!(lookup_user("root").map(|i| i.uid).ok(), Some(0));
        assert_eq!(lookup_group("root").ok(), Some(0));
        assert!(matches!(lookup_user("no-such-user-bartleby"), Err(PrivilegeError::NoUser(_))));
        assert!(matches!(lookup_group("no-such-group-bartleby"), Err(PrivilegeError::NoGroup(_))));
        assert!(matches!(lookup_user("nul\0byte"), Err(PrivilegeError::NoUser(_))));
    }
}
