//! The container image, run as the chart runs it, without a container runtime: the image's
//! root filesystem (`scripts/build-image`) mounted read-only in a mount namespace of its own,
//! the lab's directory mounted at the same path (config, policies, identities, state: the
//! chart's volumes), a tmpfs on /tmp, and root holding only NET_ADMIN, NET_RAW and
//! NET_BIND_SERVICE with no new privileges (`securityContext` of the DaemonSet).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{LabError, Result};

/// The directory `scripts/build-image` made: `$EGRESSGATE_IMAGE`, else the script's output
/// (building the image on first use).
pub fn image_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("EGRESSGATE_IMAGE") {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(root.join("scripts/build-image"))
        .current_dir(&root)
        .output()?;
    if !out.status.success() {
        return Err(LabError::new(format!(
            "scripts/build-image failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(root.join(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Writes `<lab_dir>/egressgate-from-image`, an executable that runs the image's
/// `/usr/local/bin/egressgate` with its arguments as described in the module docs. Give it to
/// [`crate::Gateway::start_named`] as the binary.
pub fn runner(lab_dir: &Path, rootfs: &Path) -> Result<PathBuf> {
    let path = lab_dir.join("egressgate-from-image");
    let script = format!(
        r#"#!/bin/sh
# egressgate from the image's root filesystem, as the chart runs it (see tests/src/image.rs).
exec unshare --mount --propagation private /bin/sh -c '
  set -e
  root=$0; lab=$1; shift
  mount --bind "$root" "$root"
  mount -t proc proc "$root/proc"
  mount --rbind /sys "$root/sys"
  mount --rbind /dev "$root/dev"
  mount -t tmpfs -o size=16m tmpfs "$root/tmp"
  mkdir -p "$root$lab"
  mount --bind "$lab" "$root$lab"
  mount -o remount,bind,ro "$root"
  exec chroot "$root" /usr/bin/setpriv --no-new-privs --inh-caps=-all \
    --bounding-set=-all,+net_admin,+net_raw,+net_bind_service /usr/local/bin/egressgate "$@"
' '{rootfs}' '{lab}' "$@"
"#,
        rootfs = rootfs.display(),
        lab = lab_dir.display(),
    );
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}
