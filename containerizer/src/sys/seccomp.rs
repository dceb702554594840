//! A default seccomp filter in the spirit of docker's profile, as a deny list: the syscalls a
//! container has no business making (kernel modules, kexec, keyrings, bpf, perf, mount API,
//! namespace creation and joining, io_uring, clock setting, swap, reboot, ...) fail with EPERM, `clone`
//! with namespace flags fails with EPERM, `clone3` fails with ENOSYS (so that libc falls back to
//! `clone`, whose flags a classic BPF filter can inspect), and foreign architectures (including
//! the x32 ABI) get ENOSYS. Everything else is allowed.
use std::io;

/// BPF_LD | BPF_W | BPF_ABS.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_JMP_JSET_K: u16 = 0x05 | 0x40;
const BPF_RET_K: u16 = 0x06;

const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
#[cfg(target_endian = "little")]
const OFF_ARG0_LO: u32 = 16;
#[cfg(target_endian = "big")]
const OFF_ARG0_LO: u32 = 20;

/// Syscalls denied with EPERM.
pub fn denied_syscalls() -> Vec<libc::c_long> {
    let mut v = vec![
        libc::SYS_acct,
        libc::SYS_add_key,
        libc::SYS_bpf,
        libc::SYS_clock_adjtime,
        libc::SYS_clock_settime,
        libc::SYS_delete_module,
        libc::SYS_finit_module,
        libc::SYS_init_module,
        libc::SYS_kcmp,
        libc::SYS_kexec_file_load,
        libc::SYS_kexec_load,
        libc::SYS_keyctl,
        libc::SYS_lookup_dcookie,
        libc::SYS_mount,
        libc::SYS_move_pages,
        libc::SYS_name_to_handle_at,
        libc::SYS_open_by_handle_at,
        libc::SYS_perf_event_open,
        libc::SYS_pivot_root,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_quotactl,
        libc::SYS_reboot,
        libc::SYS_request_key,
        libc::SYS_setns,
        libc::SYS_settimeofday,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_syslog,
        libc::SYS_umount2,
        libc::SYS_unshare,
        libc::SYS_userfaultfd,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        libc::SYS_ioperm,
        libc::SYS_iopl,
        libc::SYS_nfsservctl,
        libc::SYS_sysfs,
        libc::SYS__sysctl,
        libc::SYS_uselib,
        libc::SYS_ustat,
    ]);
    v
}

/// Namespace flags `clone` may not use.
const NS_FLAGS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

#[derive(Clone, Copy)]
enum Target {
    Next,
    Allow,
    Deny,
    Enosys,
}

struct Insn {
    code: u16,
    k: u32,
    jt: Target,
    jf: Target,
}

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        k,
        jt: Target::Next,
        jf: Target::Next,
    }
}

fn jump(code: u16, k: u32, jt: Target, jf: Target) -> Insn {
    Insn { code, k, jt, jf }
}

/// Builds the filter program.
pub fn default_filter() -> Vec<libc::sock_filter> {
    let mut body = vec![
        stmt(BPF_LD_W_ABS, OFF_ARCH),
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH, Target::Next, Target::Enosys),
        stmt(BPF_LD_W_ABS, OFF_NR),
    ];
    #[cfg(target_arch = "x86_64")]
    body.push(jump(
        BPF_JMP_JGE_K,
        0x4000_0000,
        Target::Enosys,
        Target::Next,
    ));
    body.push(jump(
        BPF_JMP_JEQ_K,
        libc::SYS_clone3 as u32,
        Target::Enosys,
        Target::Next,
    ));
    for nr in denied_syscalls() {
        body.push(jump(BPF_JMP_JEQ_K, nr as u32, Target::Deny, Target::Next));
    }
    body.push(jump(
        BPF_JMP_JEQ_K,
        libc::SYS_clone as u32,
        Target::Next,
        Target::Allow,
    ));
    body.push(stmt(BPF_LD_W_ABS, OFF_ARG0_LO));
    body.push(jump(BPF_JMP_JSET_K, NS_FLAGS, Target::Deny, Target::Allow));
    let n = body.len();
    let (allow, deny, enosys) = (n, n + 1, n + 2);
    let off = |i: usize, t: Target| -> u8 {
        let to = match t {
            Target::Next => return 0,
            Target::Allow => allow,
            Target::Deny => deny,
            Target::Enosys => enosys,
        };
        u8::try_from(to - i - 1).expect("seccomp program too long for a BPF jump")
    };
    let mut prog: Vec<libc::sock_filter> = body
        .iter()
        .enumerate()
        .map(|(i, ins)| libc::sock_filter {
            code: ins.code,
            jt: off(i, ins.jt),
            jf: off(i, ins.jf),
            k: ins.k,
        })
        .collect();
    for k in [
        SECCOMP_RET_ALLOW,
        SECCOMP_RET_ERRNO | libc::EPERM as u32,
        SECCOMP_RET_ERRNO | libc::ENOSYS as u32,
    ] {
        prog.push(libc::sock_filter {
            code: BPF_RET_K,
            jt: 0,
            jf: 0,
            k,
        });
    }
    prog
}

/// Installs the default filter on the calling thread (requires `no_new_privs` or
/// CAP_SYS_ADMIN). Inherited across fork and exec.
pub fn install_default_filter() -> io::Result<()> {
    let prog = default_filter();
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: fprog points to `prog`, which outlives the call; the kernel copies the program.
    let ret = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &fprog as *const libc::sock_fprog,
            0,
            0,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_shape() {
        let p = default_filter();
        assert!(p.len() < 255);
        assert_eq!(p.last().unwrap().k, SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
        // Every jump stays inside the program.
        for (i, ins) in p.iter().enumerate() {
            assert!(i + 1 + (ins.jt as usize) < p.len() + 1);
            assert!(i + 1 + (ins.jf as usize) < p.len() + 1);
        }
    }
}
