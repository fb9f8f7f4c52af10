//! Reading a ring buffer's items as the `#[repr(C)]` records of
//! `idgate-common` the kernel programs wrote.

/// An item that is not the size of the record it should hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("record of {got} bytes, expected {expected}")]
pub struct SizeError {
    pub got: usize,
    pub expected: usize,
}

/// Reads one ring-buffer item as a `T`.
pub fn read<T: aya::Pod>(item: &[u8]) -> Result<T, SizeError> {
    if item.len() != size_of::<T>() {
        return Err(SizeError {
            got: item.len(),
            expected: size_of::<T>(),
        });
    }
    // SAFETY: the length is the record's, and a `Pod` is plain integers
    // and byte arrays: every bit pattern is a value. The item may be
    // unaligned.
    Ok(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) })
}
