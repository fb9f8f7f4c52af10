//! The `bpf(2)` commands idgate needs and aya does not expose.
//!
//! - `BPF_LINK_DETACH`: removing a link's pin does not detach it there and
//!   then (the kernel drops the pin's reference after an RCU grace period
//!   and frees the link from a workqueue), so for a moment after `unlink`
//!   the program would still judge connects. This detaches it at once,
//!   whoever else still holds it.
//! - `BPF_MAP_UPDATE_BATCH`: every update of a map of maps waits for an RCU
//!   grace period (milliseconds) so that no program still sees the old
//!   inner map; a batch waits once for all its entries. A new trie is
//!   filled with one batch too (aya has no batch updates).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `enum bpf_cmd` values from `linux/bpf.h`.
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_LINK_DETACH: libc::c_long = 34;

/// The `BPF_OBJ_GET` member of `union bpf_attr`.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    /// The struct's tail padding, made a field so that it is zero: the
    /// kernel refuses (EINVAL) an attr with any byte set past the
    /// command's last field, and padding holds whatever was on the stack.
    _pad: u32,
}

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    /// In: entries given; out: entries done.
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The `link_detach` member of `union bpf_attr`.
#[repr(C)]
struct LinkDetachAttr {
    link_fd: u32,
}

// Every attr ends with its last field: no tail padding for the kernel to
// read as a set byte.
const _: () = assert!(
    std::mem::offset_of!(ObjGetAttr, _pad) + 4 == size_of::<ObjGetAttr>()
        && std::mem::offset_of!(BatchAttr, flags) + 8 == size_of::<BatchAttr>()
        && size_of::<LinkDetachAttr>() == 4
);

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live `repr(C)` prefix of `union bpf_attr` for
    // `cmd`, and its size is passed with it; the kernel zero-fills the rest
    // and writes back only within it. Pointers inside it are the caller's
    // (see each caller).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Detaches the link pinned at `pin` from its cgroup. The pin itself stays
/// (it now holds a defunct link); the caller removes it.
pub fn detach_pinned(pin: &Path) -> io::Result<()> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // `path` outlives the call.
    let mut get = ObjGetAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(BPF_OBJ_GET, &mut get)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    let link = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut detach = LinkDetachAttr {
        link_fd: link.as_raw_fd() as u32,
    };
    bpf(BPF_LINK_DETACH, &mut detach)?;
    Ok(())
}

/// Sets `keys[i]` to the map `values[i]` in the array of maps `map`, in
/// one call.
pub fn set_inner_maps(
    map: BorrowedFd<'_>,
    keys: &[u32],
    values: &[BorrowedFd<'_>],
) -> io::Result<()> {
    let fds: Vec<u32> = values.iter().map(|fd| fd.as_raw_fd() as u32).collect();
    update_batch(map, keys, &fds)
}

/// Sets `keys[i]` to `values[i]` in `map`, in one call: the kernel goes
/// over them itself, so filling a map with thousands of entries costs one
/// system call, not thousands. `K` and `V` are the map's key and value
/// layouts (`repr(C)`, of its key and value sizes).
pub fn update_batch<K: Copy, V: Copy>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(keys.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many entries for one batch",
        )
    })?;
    // `keys` and `values` outlive the call, and hold `count` entries each;
    // the kernel only reads them.
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_BATCH, &mut attr)?;
    if attr.count != count {
        return Err(io::Error::other(format!(
            "the kernel set {} of {} entries",
            attr.count,
            keys.len()
        )));
    }
    Ok(())
}
