//! Just enough x86-64 decoding to follow a thin wrapper function to the function it calls.
//!
//! Why: a uprobe on an instruction the kernel cannot emulate runs it out of line, one debug trap
//! per hit, and in a virtual machine that trap is far dearer than the probe's program (see
//! `loader/tls.rs`). OpenSSL's exported `SSL_read`/`SSL_write` start with such an instruction;
//! the internal functions they call start with `push`, which the kernel emulates. Finding the
//! callee means decoding the wrapper's first instructions: only the few forms compilers emit in
//! a wrapper's prologue are known here, and anything else ends the walk without an answer (the
//! caller then probes the exported function, as before).

/// How far into a function the walk looks for its first call.
const WALK_BYTES: usize = 64;

/// The address of the first `call rel32` in `code` (the function's bytes, at address `addr`),
/// when every instruction before it is one of the known prologue forms.
pub(crate) fn first_call(code: &[u8], addr: u64) -> Option<u64> {
    let mut at = 0;
    while at < WALK_BYTES.min(code.len()) {
        let rest = &code[at..];
        if rest[0] == 0xe8 {
            let rel = i32::from_le_bytes(rest.get(1..5)?.try_into().ok()?);
            let next = addr.checked_add(u64::try_from(at + 5).ok()?)?;
            return next.checked_add_signed(i64::from(rel));
        }
        at += prologue_len(rest)?;
    }
    None
}

/// Whether the kernel's uprobes emulate this first instruction (no out-of-line single step):
/// `push` of a register, the only form a function entry starts with among those it emulates.
pub(crate) fn emulated_entry(code: &[u8]) -> bool {
    matches!(code, [0x50..=0x57, ..] | [0x41, 0x50..=0x57, ..])
}

/// The length of one instruction of the forms a wrapper's prologue uses before its call, `None`
/// for anything else.
#[expect(clippy::match_same_arms, reason = "one arm per instruction form, each named")]
fn prologue_len(b: &[u8]) -> Option<usize> {
    let reg_to_reg = |modrm: Option<&u8>| modrm.is_some_and(|m| m >> 6 == 0b11);
    let len = match *b {
        // endbr64
        [0xf3, 0x0f, 0x1e, 0xfa, ..] => 4,
        // push r64
        [0x50..=0x57, ..] => 1,
        [0x41, 0x50..=0x57, ..] => 2,
        // sub/add $imm8, %rsp; sub $imm32, %rsp
        [0x48, 0x83, 0xec | 0xc4, _, ..] => 4,
        [0x48, 0x81, 0xec, ..] => 7,
        // mov %fs:disp32, r64 (the stack protector's canary)
        [0x64, 0x48 | 0x4c, 0x8b, m, 0x25, ..] if m & 0xc7 == 0x04 => 9,
        // mov r64, disp8(%rsp)
        [0x48 | 0x4c, 0x89, m, 0x24, _, ..] if m & 0xc7 == 0x44 => 5,
        // xor/test/mov between 32-bit registers
        [0x31 | 0x85 | 0x89 | 0x8b, ..] if reg_to_reg(b.get(1)) => 2,
        // the same between 64-bit registers, and movslq (movsxd)
        [0x48 | 0x49 | 0x4c | 0x4d, 0x31 | 0x85 | 0x89 | 0x8b | 0x63, ..]
            if reg_to_reg(b.get(2)) =>
        {
            3
        }
        // a short conditional jump (an argument check's way to the error path)
        [0x70..=0x7f, _, ..] => 2,
        _ => return None,
    };
    (len <= b.len()).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `SSL_read` of Debian 12's OpenSSL 3.0: stack protector, a sign check, the call.
    const SSL_READ: &[u8] = &[
        0x48, 0x83, 0xec, 0x18, // sub $0x18,%rsp
        0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0x00, 0x00, 0x00, // mov %fs:0x28,%rax
        0x48, 0x89, 0x44, 0x24, 0x08, // mov %rax,0x8(%rsp)
        0x31, 0xc0, // xor %eax,%eax
        0x85, 0xd2, // test %edx,%edx
        0x78, 0x2f, // js
        0x48, 0x89, 0xe1, // mov %rsp,%rcx
        0x48, 0x63, 0xd2, // movslq %edx,%rdx
        0xe8, 0x3d, 0xfe, 0xff, 0xff, // call 35290
        0x85, 0xc0, // test %eax,%eax
    ];

    #[test]
    fn follows_a_wrapper_to_its_callee() {
        assert_eq!(first_call(SSL_READ, 0x35430), Some(0x35290));
        // SSL_read_ex: sub $0x8,%rsp; call 35290.
        let ex = [0x48, 0x83, 0xec, 0x08, 0xe8, 0xc7, 0xfd, 0xff, 0xff];
        assert_eq!(first_call(&ex, 0x354c0), Some(0x35290));
        // With an endbr64 first and a forward call.
        let cet = [0xf3, 0x0f, 0x1e, 0xfa, 0xe8, 0x10, 0x00, 0x00, 0x00];
        assert_eq!(first_call(&cet, 0x1000), Some(0x1019));
    }

    #[test]
    fn gives_up_on_what_it_does_not_know() {
        // lea 0x10(%rip),%rdi before the call: an argument changed by an unknown form.
        let unknown = [0x48, 0x8d, 0x3d, 0x10, 0x00, 0x00, 0x00, 0xe8, 0, 0, 0, 0];
        assert_eq!(first_call(&unknown, 0x1000), None);
        // A jump before any call: the walk does not follow it.
        assert_eq!(first_call(&[0xe9, 0, 0, 0, 0], 0x1000), None);
        // Cut short inside an instruction or before the call's operand.
        assert_eq!(first_call(&SSL_READ[..6], 0x1000), None);
        assert_eq!(first_call(&SSL_READ[..32], 0x1000), None);
        // No call within the walk.
        let mut long = [0x31, 0xc0].repeat(40);
        long.extend([0xe8, 0, 0, 0, 0]);
        assert_eq!(first_call(&long, 0x1000), None);
        assert_eq!(first_call(&long[60..], 0x1000), Some(0x1000 + 25));
    }

    #[test]
    fn knows_which_entries_are_emulated() {
        assert!(emulated_entry(&[0x41, 0x55, 0x41, 0x54]));
        assert!(emulated_entry(&[0x53]));
        assert!(!emulated_entry(&SSL_READ[..4]));
        assert!(!emulated_entry(&[0xf3, 0x0f, 0x1e, 0xfa]));
        assert!(!emulated_entry(&[]));
    }
}
