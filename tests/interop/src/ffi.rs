//! Raw declarations of the C shim (csrc/shim.c). Only `bzrtp.rs` uses them.
//!
//! When bzrtp is not installed (`cfg(no_bzrtp)`), the same names exist as
//! stubs: `kshim_new` always fails, so no other stub is ever reached.

#![allow(missing_docs)]

use std::os::raw::{c_char, c_int, c_long};

/// Mirrors `kshim_config` in shim.c.
#[repr(C)]
pub struct ShimConfig {
    pub cache_path: *const c_char,
    pub self_uri: *const c_char,
    pub peer_uri: *const c_char,
    pub ssrc: u32,
    pub hash: *const u8,
    pub hash_count: u8,
    pub cipher: *const u8,
    pub cipher_count: u8,
    pub auth_tag: *const u8,
    pub auth_tag_count: u8,
    pub key_agreement: *const u8,
    pub key_agreement_count: u8,
    pub sas: *const u8,
    pub sas_count: u8,
    pub export_label: *const u8,
    pub export_label_len: usize,
    pub aux_secret: *const u8,
    pub aux_secret_len: usize,
}

/// Opaque `kshim_endpoint`.
#[repr(C)]
pub struct ShimEndpoint {
    _private: [u8; 0],
}

#[cfg(not(no_bzrtp))]
extern "C" {
    pub fn kshim_new(
        cfg: *const ShimConfig,
        stage: *mut c_int,
        detail: *mut c_int,
    ) -> *mut ShimEndpoint;
    pub fn kshim_free(ep: *mut ShimEndpoint);
    pub fn kshim_start(ep: *mut ShimEndpoint) -> c_int;
    pub fn kshim_iterate(ep: *mut ShimEndpoint, now_ms: u64) -> c_int;
    pub fn kshim_process(ep: *mut ShimEndpoint, packet: *const u8, len: usize) -> c_int;
    pub fn kshim_next_len(ep: *const ShimEndpoint) -> usize;
    pub fn kshim_pop(ep: *mut ShimEndpoint, buf: *mut u8, cap: usize) -> usize;
    pub fn kshim_queue_overflowed(ep: *const ShimEndpoint) -> c_int;
    pub fn kshim_channel_status(ep: *const ShimEndpoint) -> c_int;
    pub fn kshim_sas(ep: *const ShimEndpoint, buf: *mut c_char, cap: usize) -> usize;
    pub fn kshim_algos(ep: *const ShimEndpoint, out: *mut u8) -> c_int;
    pub fn kshim_flags(ep: *const ShimEndpoint, out: *mut i32);
    pub fn kshim_exported_key(ep: *const ShimEndpoint, buf: *mut u8, cap: usize) -> usize;
    pub fn kshim_srtp(ep: *const ShimEndpoint, which: c_int, buf: *mut u8, cap: usize) -> usize;
    pub fn kshim_rs_at_export(
        ep: *const ShimEndpoint,
        which: c_int,
        buf: *mut u8,
        cap: usize,
    ) -> usize;
    pub fn kshim_cache_read(
        ep: *mut ShimEndpoint,
        column: *const c_char,
        buf: *mut u8,
        cap: usize,
    ) -> c_long;
    pub fn kshim_cache_write(
        ep: *mut ShimEndpoint,
        column: *const c_char,
        data: *const u8,
        len: usize,
    ) -> c_int;
    pub fn kshim_resolve_zuid(ep: *mut ShimEndpoint, peer_zid: *const u8) -> c_int;
    pub fn kshim_sas_verified(ep: *mut ShimEndpoint);
    pub fn kshim_sas_reset_verified(ep: *mut ShimEndpoint);
    pub fn kshim_self_hello_hash(ep: *mut ShimEndpoint, buf: *mut c_char, cap: usize) -> c_int;
    pub fn kshim_peer_status(ep: *mut ShimEndpoint) -> c_int;
}

#[cfg(no_bzrtp)]
mod stubs {
    use super::{c_char, c_int, c_long, ShimConfig, ShimEndpoint};
    use std::ptr;

    pub unsafe fn kshim_new(
        _: *const ShimConfig,
        stage: *mut c_int,
        _: *mut c_int,
    ) -> *mut ShimEndpoint {
        // SAFETY: the caller passes a valid out pointer.
        unsafe { *stage = -1 };
        ptr::null_mut()
    }
    pub unsafe fn kshim_free(_: *mut ShimEndpoint) {}
    pub unsafe fn kshim_start(_: *mut ShimEndpoint) -> c_int {
        -1
    }
    pub unsafe fn kshim_iterate(_: *mut ShimEndpoint, _: u64) -> c_int {
        -1
    }
    pub unsafe fn kshim_process(_: *mut ShimEndpoint, _: *const u8, _: usize) -> c_int {
        -1
    }
    pub unsafe fn kshim_next_len(_: *const ShimEndpoint) -> usize {
        0
    }
    pub unsafe fn kshim_pop(_: *mut ShimEndpoint, _: *mut u8, _: usize) -> usize {
        0
    }
    pub unsafe fn kshim_queue_overflowed(_: *const ShimEndpoint) -> c_int {
        0
    }
    pub unsafe fn kshim_channel_status(_: *const ShimEndpoint) -> c_int {
        0
    }
    pub unsafe fn kshim_sas(_: *const ShimEndpoint, _: *mut c_char, _: usize) -> usize {
        0
    }
    pub unsafe fn kshim_algos(_: *const ShimEndpoint, _: *mut u8) -> c_int {
        0
    }
    pub unsafe fn kshim_flags(_: *const ShimEndpoint, _: *mut i32) {}
    pub unsafe fn kshim_exported_key(_: *const ShimEndpoint, _: *mut u8, _: usize) -> usize {
        0
    }
    pub unsafe fn kshim_srtp(_: *const ShimEndpoint, _: c_int, _: *mut u8, _: usize) -> usize {
        0
    }
    pub unsafe fn kshim_rs_at_export(
        _: *const ShimEndpoint,
        _: c_int,
        _: *mut u8,
        _: usize,
    ) -> usize {
        0
    }
    pub unsafe fn kshim_cache_read(
        _: *mut ShimEndpoint,
        _: *const c_char,
        _: *mut u8,
        _: usize,
    ) -> c_long {
        -1
    }
    pub unsafe fn kshim_cache_write(
        _: *mut ShimEndpoint,
        _: *const c_char,
        _: *const u8,
        _: usize,
    ) -> c_int {
        -1
    }
    pub unsafe fn kshim_resolve_zuid(_: *mut ShimEndpoint, _: *const u8) -> c_int {
        -1
    }
    pub unsafe fn kshim_sas_verified(_: *mut ShimEndpoint) {}
    pub unsafe fn kshim_sas_reset_verified(_: *mut ShimEndpoint) {}
    pub unsafe fn kshim_self_hello_hash(_: *mut ShimEndpoint, _: *mut c_char, _: usize) -> c_int {
        -1
    }
    pub unsafe fn kshim_peer_status(_: *mut ShimEndpoint) -> c_int {
        -1
    }
}
#[cfg(no_bzrtp)]
pub use stubs::*;
