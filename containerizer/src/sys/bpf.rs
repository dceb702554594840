//! A minimal eBPF loader over bpf(2): hand-assembled instructions, `BPF_PROG_LOAD` and
//! `BPF_PROG_ATTACH` to a cgroup. Enough for a `BPF_PROG_TYPE_CGROUP_DEVICE` program (the
//! cgroup v2 device controller), without a BPF crate.
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// `BPF_PROG_TYPE_CGROUP_DEVICE`.
pub const PROG_TYPE_CGROUP_DEVICE: u32 = 15;
/// `BPF_CGROUP_DEVICE` attach type.
pub const ATTACH_CGROUP_DEVICE: u32 = 6;
/// `BPF_F_ALLOW_MULTI`: other programs (ours or a parent's) keep running, all must allow.
pub const F_ALLOW_MULTI: u32 = 2;

const CMD_PROG_LOAD: libc::c_long = 5;
const CMD_PROG_ATTACH: libc::c_long = 8;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    /// dst register in the low nibble, src in the high one.
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// Registers.
pub const R0: u8 = 0;
pub const R1: u8 = 1;
pub const R2: u8 = 2;
pub const R3: u8 = 3;
pub const R4: u8 = 4;
pub const R5: u8 = 5;

impl Insn {
    const fn new(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
        Insn {
            code,
            regs: (dst & 0xf) | ((src & 0xf) << 4),
            off,
            imm,
        }
    }
    /// `dst = *(u32 *)(src + off)` (BPF_LDX | BPF_MEM | BPF_W).
    pub const fn ldx_w(dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(0x61, dst, src, off, 0)
    }
    /// `dst = src` (32-bit, BPF_ALU | BPF_MOV | BPF_X).
    pub const fn mov32_reg(dst: u8, src: u8) -> Insn {
        Insn::new(0xbc, dst, src, 0, 0)
    }
    /// `dst = imm` (64-bit, BPF_ALU64 | BPF_MOV | BPF_K).
    pub const fn mov64_imm(dst: u8, imm: i32) -> Insn {
        Insn::new(0xb7, dst, 0, 0, imm)
    }
    /// `dst &= imm` (32-bit).
    pub const fn and32_imm(dst: u8, imm: i32) -> Insn {
        Insn::new(0x54, dst, 0, 0, imm)
    }
    /// `dst >>= imm` (32-bit, logical).
    pub const fn rsh32_imm(dst: u8, imm: i32) -> Insn {
        Insn::new(0x74, dst, 0, 0, imm)
    }
    /// `if dst != imm goto +off`.
    pub const fn jne_imm(dst: u8, imm: i32, off: i16) -> Insn {
        Insn::new(0x55, dst, 0, off, imm)
    }
    /// `if dst != src goto +off`.
    pub const fn jne_reg(dst: u8, src: u8, off: i16) -> Insn {
        Insn::new(0x5d, dst, src, off, 0)
    }
    /// `return r0`.
    pub const fn exit() -> Insn {
        Insn::new(0x95, 0, 0, 0, 0)
    }
    /// True for conditional jumps (whose `off` a builder patches).
    pub fn is_jump(&self) -> bool {
        matches!(self.code, 0x55 | 0x5d)
    }
}

/// `union bpf_attr` as `BPF_PROG_LOAD` reads it (up to `expected_attach_type`); the kernel
/// treats the fields past the size we pass as zero.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` as `BPF_PROG_ATTACH` reads it.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised #[repr(C)] prefix of `union bpf_attr` for `cmd`,
    // and its exact size is passed, so the kernel reads (and writes) only within it. Pointers
    // stored inside it are valid for the duration of the call (guaranteed by the callers).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T as *mut libc::c_void,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Loads `insns` as a program of type `prog_type`. On a verifier rejection the error carries
/// the verifier's log.
pub fn prog_load(prog_type: u32, insns: &[Insn], name: &str) -> io::Result<OwnedFd> {
    let license = CString::new("Apache-2.0").expect("no NUL");
    let mut prog_name = [0u8; 16];
    for (d, s) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *d = s;
    }
    let mut attr = ProgLoadAttr {
        prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name,
        ..Default::default()
    };
    let fd = match bpf(CMD_PROG_LOAD, &mut attr) {
        Ok(fd) => fd,
        Err(e)
            if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EACCES) =>
        {
            // Load again with a log buffer, for a message that says what the verifier disliked.
            let mut log = vec![0u8; 64 * 1024];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            match bpf(CMD_PROG_LOAD, &mut attr) {
                Ok(fd) => fd,
                Err(_) => {
                    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
                    let text = String::from_utf8_lossy(&log[..end]);
                    return Err(io::Error::new(
                        e.kind(),
                        format!("{e}; verifier: {}", text.trim()),
                    ));
                }
            }
        }
        Err(e) => return Err(e),
    };
    // SAFETY: a successful BPF_PROG_LOAD returns a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches `prog` to the cgroup v2 directory `cgroup` (`BPF_PROG_ATTACH`). The attachment
/// holds a reference on the program: it lives as long as the cgroup, the fd may be closed.
pub fn prog_attach_cgroup(
    cgroup: &Path,
    prog: &OwnedFd,
    attach_type: u32,
    flags: u32,
) -> io::Result<()> {
    let dir = std::fs::File::open(cgroup)?;
    let mut attr = ProgAttachAttr {
        target_fd: dir.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: flags,
        ..Default::default()
    };
    bpf(CMD_PROG_ATTACH, &mut attr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding() {
        assert_eq!(std::mem::size_of::<Insn>(), 8);
        let i = Insn::ldx_w(R2, R1, 4);
        assert_eq!((i.code, i.regs, i.off), (0x61, 0x12, 4));
        let j = Insn::jne_reg(R1, R3, 7);
        assert_eq!((j.code, j.regs, j.off), (0x5d, 0x31, 7));
        assert!(j.is_jump() && !Insn::exit().is_jump());
    }
}
