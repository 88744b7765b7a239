//! hopwatch's kernel programs.
//!
//! One module per hook family; each opens with why its hooks were chosen. Shared state lives in
//! [`maps`], reads of kernel structs in [`kernel`] (offsets come from userspace, computed from this
//! kernel's BTF: Rust eBPF has no CO-RE relocations).
#![no_std]
#![no_main]
// `asm!` for the BPF atomic add (`causality`).
#![feature(asm_experimental_arch)]

mod causality;
mod drop;
mod emit;
mod exchange;
mod kernel;
mod l7;
mod maps;
mod nginx;
mod python;
mod sockops;
mod syscalls;
mod tcp;
mod tls;
mod tls_handshake;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The programs call GPL-only helpers (bpf_probe_read_kernel, bpf_ktime_get_ns in tracing).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
