//! The default seccomp filter: docker's default profile, as an allow list. The syscalls an
//! ordinary program makes are allowed; everything else fails with EPERM: kernel modules,
//! kexec, keyrings, bpf, perf, the mount API, namespace creation and joining, io_uring, clock
//! setting, swap, reboot, NUMA policy, ... (most of which the default capabilities would refuse
//! anyway). Special cases, as in docker's profile: `clone` with namespace flags fails with
//! EPERM; `clone3` fails with ENOSYS (so that libc falls back to `clone`, whose flags a classic
//! BPF filter can inspect); `personality` takes only the usual personas; `socket` refuses
//! AF_VSOCK. Syscalls newer than any we know, foreign architectures and the x32 ABI get ENOSYS,
//! so that programs fall back as on an older kernel.
//!
//! The allowed numbers are searched with a balanced tree of comparisons over their runs (a
//! handful per syscall, not hundreds, and a short program for the kernel to check and compile
//! at every task's start); the kernel also caches the verdict of argument-free rules.
use std::io;

/// BPF_LD | BPF_W | BPF_ABS.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JA: u16 = 0x05;
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10;
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30;
const BPF_JMP_JSET_K: u16 = 0x05 | 0x40;
const BPF_RET_K: u16 = 0x06;

const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const RET_EPERM: u32 = SECCOMP_RET_ERRNO | libc::EPERM as u32;
const RET_ENOSYS: u32 = SECCOMP_RET_ERRNO | libc::ENOSYS as u32;

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

/// The highest syscall number we have an opinion on (`mseal`, Linux 6.10, the same on both
/// architectures); anything above gets ENOSYS.
const MAX_KNOWN: u32 = 462;

/// Allowed personas (`personality`'s argument), as in docker's profile: PER_LINUX,
/// PER_LINUX32, UNAME26, UNAME26|PER_LINUX32, and the query 0xffffffff.
const PERSONAS: [u32; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

const AF_VSOCK: u32 = 40;

/// Syscalls allowed without conditions (`clone`, `personality` and `socket` have rules of
/// their own).
pub fn allowed_syscalls() -> Vec<libc::c_long> {
    use libc::*;
    let mut v = vec![
        SYS_accept,
        SYS_accept4,
        SYS_bind,
        SYS_brk,
        SYS_capget,
        SYS_capset,
        SYS_chdir,
        SYS_chroot,
        SYS_clock_getres,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_close,
        SYS_close_range,
        SYS_connect,
        SYS_copy_file_range,
        SYS_dup,
        SYS_dup3,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_pwait,
        SYS_epoll_pwait2,
        SYS_eventfd2,
        SYS_execve,
        SYS_execveat,
        SYS_exit,
        SYS_exit_group,
        SYS_faccessat,
        SYS_faccessat2,
        SYS_fadvise64,
        SYS_fallocate,
        SYS_fanotify_mark,
        SYS_fchdir,
        SYS_fchmod,
        SYS_fchmodat,
        SYS_fchmodat2,
        SYS_fchown,
        SYS_fchownat,
        SYS_fcntl,
        SYS_fdatasync,
        SYS_fgetxattr,
        SYS_flistxattr,
        SYS_flock,
        SYS_fremovexattr,
        SYS_fsetxattr,
        SYS_fstat,
        SYS_fstatfs,
        SYS_fsync,
        SYS_ftruncate,
        SYS_futex,
        SYS_futex_waitv,
        SYS_getcpu,
        SYS_getcwd,
        SYS_getdents64,
        SYS_getegid,
        SYS_geteuid,
        SYS_getgid,
        SYS_getgroups,
        SYS_getitimer,
        SYS_getpeername,
        SYS_getpgid,
        SYS_getpid,
        SYS_getppid,
        SYS_getpriority,
        SYS_getrandom,
        SYS_getresgid,
        SYS_getresuid,
        SYS_getrlimit,
        SYS_get_robust_list,
        SYS_getrusage,
        SYS_getsid,
        SYS_getsockname,
        SYS_getsockopt,
        SYS_gettid,
        SYS_gettimeofday,
        SYS_getuid,
        SYS_getxattr,
        SYS_inotify_add_watch,
        SYS_inotify_init1,
        SYS_inotify_rm_watch,
        SYS_io_cancel,
        SYS_ioctl,
        SYS_io_destroy,
        SYS_io_getevents,
        SYS_ioprio_get,
        SYS_ioprio_set,
        SYS_io_setup,
        SYS_io_submit,
        SYS_kill,
        SYS_landlock_add_rule,
        SYS_landlock_create_ruleset,
        SYS_landlock_restrict_self,
        SYS_lgetxattr,
        SYS_linkat,
        SYS_listen,
        SYS_listxattr,
        SYS_llistxattr,
        SYS_lremovexattr,
        SYS_lseek,
        SYS_lsetxattr,
        SYS_madvise,
        SYS_membarrier,
        SYS_memfd_create,
        SYS_memfd_secret,
        SYS_mincore,
        SYS_mkdirat,
        SYS_mknodat,
        SYS_mlock,
        SYS_mlock2,
        SYS_mlockall,
        SYS_mmap,
        SYS_mprotect,
        SYS_mq_getsetattr,
        SYS_mq_notify,
        SYS_mq_open,
        SYS_mq_timedreceive,
        SYS_mq_timedsend,
        SYS_mq_unlink,
        SYS_mremap,
        SYS_mseal,
        SYS_msgctl,
        SYS_msgget,
        SYS_msgrcv,
        SYS_msgsnd,
        SYS_msync,
        SYS_munlock,
        SYS_munlockall,
        SYS_munmap,
        SYS_nanosleep,
        SYS_newfstatat,
        SYS_openat,
        SYS_openat2,
        SYS_pidfd_open,
        SYS_pidfd_send_signal,
        SYS_pipe2,
        SYS_pkey_alloc,
        SYS_pkey_free,
        SYS_pkey_mprotect,
        SYS_ppoll,
        SYS_prctl,
        SYS_pread64,
        SYS_preadv,
        SYS_preadv2,
        SYS_prlimit64,
        SYS_process_mrelease,
        SYS_pselect6,
        SYS_pwrite64,
        SYS_pwritev,
        SYS_pwritev2,
        SYS_read,
        SYS_readahead,
        SYS_readlinkat,
        SYS_readv,
        SYS_recvfrom,
        SYS_recvmmsg,
        SYS_recvmsg,
        SYS_remap_file_pages,
        SYS_removexattr,
        SYS_renameat,
        SYS_renameat2,
        SYS_restart_syscall,
        SYS_rseq,
        SYS_rt_sigaction,
        SYS_rt_sigpending,
        SYS_rt_sigprocmask,
        SYS_rt_sigqueueinfo,
        SYS_rt_sigreturn,
        SYS_rt_sigsuspend,
        SYS_rt_sigtimedwait,
        SYS_rt_tgsigqueueinfo,
        SYS_sched_getaffinity,
        SYS_sched_getattr,
        SYS_sched_getparam,
        SYS_sched_get_priority_max,
        SYS_sched_get_priority_min,
        SYS_sched_getscheduler,
        SYS_sched_rr_get_interval,
        SYS_sched_setaffinity,
        SYS_sched_setattr,
        SYS_sched_setparam,
        SYS_sched_setscheduler,
        SYS_sched_yield,
        SYS_seccomp,
        SYS_semctl,
        SYS_semget,
        SYS_semop,
        SYS_semtimedop,
        SYS_sendfile,
        SYS_sendmmsg,
        SYS_sendmsg,
        SYS_sendto,
        SYS_setfsgid,
        SYS_setfsuid,
        SYS_setgid,
        SYS_setgroups,
        SYS_setitimer,
        SYS_setpgid,
        SYS_setpriority,
        SYS_setregid,
        SYS_setresgid,
        SYS_setresuid,
        SYS_setreuid,
        SYS_setrlimit,
        SYS_set_robust_list,
        SYS_setsid,
        SYS_setsockopt,
        SYS_set_tid_address,
        SYS_setuid,
        SYS_setxattr,
        SYS_shmat,
        SYS_shmctl,
        SYS_shmdt,
        SYS_shmget,
        SYS_shutdown,
        SYS_sigaltstack,
        SYS_signalfd4,
        SYS_socketpair,
        SYS_splice,
        SYS_statfs,
        SYS_statx,
        SYS_symlinkat,
        SYS_sync,
        SYS_sync_file_range,
        SYS_syncfs,
        SYS_sysinfo,
        SYS_tee,
        SYS_tgkill,
        SYS_timer_create,
        SYS_timer_delete,
        SYS_timer_getoverrun,
        SYS_timer_gettime,
        SYS_timer_settime,
        SYS_timerfd_create,
        SYS_timerfd_gettime,
        SYS_timerfd_settime,
        SYS_times,
        SYS_tkill,
        SYS_truncate,
        SYS_umask,
        SYS_uname,
        SYS_unlinkat,
        SYS_utimensat,
        SYS_vmsplice,
        SYS_wait4,
        SYS_waitid,
        SYS_write,
        SYS_writev,
        // Not in this libc's tables yet: cachestat, futex_wake, futex_wait, futex_requeue
        // (the same numbers on both architectures).
        451,
        454,
        455,
        456,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        SYS_access,
        SYS_alarm,
        SYS_arch_prctl,
        SYS_chmod,
        SYS_chown,
        SYS_creat,
        SYS_dup2,
        SYS_epoll_create,
        SYS_epoll_wait,
        SYS_eventfd,
        SYS_fork,
        SYS_futimesat,
        SYS_getdents,
        SYS_getpgrp,
        SYS_inotify_init,
        SYS_lchown,
        SYS_link,
        SYS_lstat,
        SYS_mkdir,
        SYS_mknod,
        SYS_open,
        SYS_pause,
        SYS_pipe,
        SYS_poll,
        SYS_readlink,
        SYS_rename,
        SYS_rmdir,
        SYS_select,
        SYS_signalfd,
        SYS_stat,
        SYS_symlink,
        SYS_time,
        SYS_unlink,
        SYS_utime,
        SYS_utimes,
        SYS_vfork,
        // io_pgetevents, map_shadow_stack (not in this libc's table yet).
        333,
        453,
    ]);
    #[cfg(target_arch = "aarch64")]
    v.extend([292, 453]);
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

fn ins(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

fn ret(k: u32) -> libc::sock_filter {
    ins(BPF_RET_K, k, 0, 0)
}

/// The points where the verdict changes along the sorted, deduplicated syscall numbers
/// `nrs` (allowed): each run of consecutive numbers gives its first number (ALLOW from there)
/// and the one after its last (EPERM from there). Below the first point: EPERM.
fn cuts(nrs: &[u32]) -> Vec<u32> {
    let mut cuts = vec![];
    for (i, &nr) in nrs.iter().enumerate() {
        if i == 0 || nrs[i - 1] + 1 != nr {
            cuts.push(nr);
        }
        if nrs.get(i + 1) != Some(&(nr + 1)) {
            cuts.push(nr + 1);
        }
    }
    cuts
}

/// A balanced search over the verdict's change points (syscall number in the accumulator;
/// `below`: the verdict under the first point). The allowed numbers come in runs, so this is a
/// few times shorter than one comparison per number, and the kernel checks and compiles every
/// instruction at each task's start. Small leaves are a chain of `>=` tests, each jumping to its
/// own return; the right half of a node is reached with an unconditional jump (32-bit offset),
/// so no conditional jump (8-bit offset) goes far.
fn search(cuts: &[u32], below: u32) -> Vec<libc::sock_filter> {
    const LEAF: usize = 6;
    let flip = |v: u32, n: usize| match n % 2 {
        0 => v,
        _ if v == SECCOMP_RET_ALLOW => RET_EPERM,
        _ => SECCOMP_RET_ALLOW,
    };
    let m = cuts.len();
    if m <= LEAF {
        // Highest point first: the first test that holds returns that point's verdict.
        let mut v: Vec<_> = (0..m)
            .map(|i| ins(BPF_JMP_JGE_K, cuts[m - 1 - i], m as u8, 0))
            .collect();
        v.push(ret(below));
        v.extend((0..m).map(|i| ret(flip(below, m - i))));
        return v;
    }
    let mid = m / 2;
    let left = search(&cuts[..mid], below);
    let mut v = vec![
        // nr >= cuts[mid]: the next instruction (the jump to the right half); else skip it.
        ins(BPF_JMP_JGE_K, cuts[mid], 0, 1),
        ins(BPF_JMP_JA, left.len() as u32, 0, 0),
    ];
    v.extend(left);
    v.extend(search(&cuts[mid + 1..], flip(below, mid + 1)));
    v
}

/// Builds the filter program.
pub fn default_filter() -> Vec<libc::sock_filter> {
    let mut nrs: Vec<u32> = allowed_syscalls().into_iter().map(|n| n as u32).collect();
    // The calls with rules of their own never reach the search: counted as allowed there,
    // they join runs and shorten it.
    nrs.extend(
        [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_personality,
            libc::SYS_socket,
        ]
        .map(|n| n as u32),
    );
    nrs.sort_unstable();
    nrs.dedup();

    // The checks before the search jump to these three returns, placed right after them.
    enum To {
        Next,
        Allow,
        Eperm,
        Enosys,
        Clone,
        Persona,
        Socket,
    }
    use To::*;
    let mut pre: Vec<(u16, u32, To, To)> = vec![
        (BPF_LD_W_ABS, OFF_ARCH, Next, Next),
        (BPF_JMP_JEQ_K, AUDIT_ARCH, Next, Enosys),
        (BPF_LD_W_ABS, OFF_NR, Next, Next),
    ];
    #[cfg(target_arch = "x86_64")]
    pre.push((BPF_JMP_JGE_K, 0x4000_0000, Enosys, Next));
    pre.extend([
        (BPF_JMP_JGE_K, MAX_KNOWN + 1, Enosys, Next),
        (BPF_JMP_JEQ_K, libc::SYS_clone3 as u32, Enosys, Next),
        (BPF_JMP_JEQ_K, libc::SYS_clone as u32, Clone, Next),
        (BPF_JMP_JEQ_K, libc::SYS_personality as u32, Persona, Next),
        (BPF_JMP_JEQ_K, libc::SYS_socket as u32, Socket, Next),
    ]);
    // Then: jump over the rules below to the search (the accumulator still holds the nr).
    let mut rules: Vec<(u16, u32, To, To)> = vec![
        // Clone:
        (BPF_LD_W_ABS, OFF_ARG0_LO, Next, Next),
        (BPF_JMP_JSET_K, NS_FLAGS, Eperm, Allow),
        // Persona:
        (BPF_LD_W_ABS, OFF_ARG0_LO, Next, Next),
    ];
    for p in PERSONAS {
        rules.push((BPF_JMP_JEQ_K, p, Allow, Next));
    }
    rules.push((BPF_JMP_JA, 0, Eperm, Eperm));
    // Socket:
    rules.extend([
        (BPF_LD_W_ABS, OFF_ARG0_LO, Next, Next),
        (BPF_JMP_JEQ_K, AF_VSOCK, Eperm, Allow),
    ]);
    let clone_at = pre.len() + 1;
    let persona_at = clone_at + 2;
    let socket_at = persona_at + 1 + PERSONAS.len() + 1;
    let rets_at = pre.len() + 1 + rules.len();
    let (allow, eperm, enosys) = (rets_at, rets_at + 1, rets_at + 2);
    let search_at = rets_at + 3;
    let mut prog = vec![];
    let all: Vec<_> = pre.into_iter().chain(rules).collect();
    let n_pre = clone_at - 1;
    for (i, (code, k, jt, jf)) in all.into_iter().enumerate() {
        // Instruction i of the program: the pre-checks, then (after the jump to the search)
        // the rules.
        let at = if i < n_pre { i } else { i + 1 };
        let off = |t: &To| -> u8 {
            let to = match t {
                Next => return 0,
                Allow => allow,
                Eperm => eperm,
                Enosys => enosys,
                Clone => clone_at,
                Persona => persona_at,
                Socket => socket_at,
            };
            u8::try_from(to - at - 1).expect("seccomp pre-checks fit short jumps")
        };
        if i == n_pre {
            prog.push(ins(BPF_JMP_JA, (search_at - n_pre - 1) as u32, 0, 0));
        }
        if code == BPF_JMP_JA {
            // Only used as "go to EPERM".
            prog.push(ins(BPF_JMP_JA, (eperm - at - 1) as u32, 0, 0));
        } else {
            prog.push(ins(code, k, off(&jt), off(&jf)));
        }
    }
    debug_assert_eq!(prog.len(), rets_at);
    prog.extend([ret(SECCOMP_RET_ALLOW), ret(RET_EPERM), ret(RET_ENOSYS)]);
    prog.extend(search(&cuts(&nrs), RET_EPERM));
    prog
}

/// Installs the default filter on the calling thread (requires `no_new_privs` or
/// CAP_SYS_ADMIN). Inherited across fork and exec.
pub fn install_default_filter() -> io::Result<()> {
    install_filter(cached_default_filter())
}

/// [`default_filter`], built once per process (a fork server builds it before forking, so
/// that no supervisor builds it again).
pub fn cached_default_filter() -> &'static [libc::sock_filter] {
    static PROG: std::sync::OnceLock<Vec<libc::sock_filter>> = std::sync::OnceLock::new();
    PROG.get_or_init(default_filter)
}

/// Installs `prog` (e.g. [`default_filter`] built ahead, in a warm sandbox) on the calling
/// thread; `no_new_privs` (or CAP_SYS_ADMIN) is required.
pub fn install_filter(prog: &[libc::sock_filter]) -> io::Result<()> {
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

    /// A classic BPF interpreter for the instructions we emit.
    fn eval(p: &[libc::sock_filter], arch: u32, nr: u32, arg0: u32) -> u32 {
        let (mut pc, mut a) = (0usize, 0u32);
        for _ in 0..10_000 {
            let i = p[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => {
                    a = match i.k {
                        OFF_NR => nr,
                        OFF_ARCH => arch,
                        OFF_ARG0_LO => arg0,
                        k => panic!("load of offset {k}"),
                    }
                }
                BPF_JMP_JA => pc += i.k as usize,
                BPF_JMP_JEQ_K | BPF_JMP_JGE_K | BPF_JMP_JSET_K => {
                    let t = match i.code {
                        BPF_JMP_JEQ_K => a == i.k,
                        BPF_JMP_JGE_K => a >= i.k,
                        _ => a & i.k != 0,
                    };
                    pc += if t { i.jt } else { i.jf } as usize;
                }
                BPF_RET_K => return i.k,
                c => panic!("opcode {c:#x}"),
            }
        }
        panic!("no return")
    }

    #[test]
    fn every_syscall_gets_the_profiles_verdict() {
        let p = default_filter();
        // One comparison per run of allowed numbers, not per number.
        assert!(p.len() < allowed_syscalls().len(), "{}", p.len());
        let allowed: Vec<u32> = allowed_syscalls().iter().map(|&n| n as u32).collect();
        let special = [
            libc::SYS_clone as u32,
            libc::SYS_clone3 as u32,
            libc::SYS_personality as u32,
            libc::SYS_socket as u32,
        ];
        for nr in 0..=MAX_KNOWN + 50 {
            let got = eval(&p, AUDIT_ARCH, nr, 0);
            let want = if nr == libc::SYS_clone3 as u32 || nr > MAX_KNOWN {
                RET_ENOSYS
            } else if allowed.contains(&nr) || special.contains(&nr) {
                SECCOMP_RET_ALLOW
            } else {
                RET_EPERM
            };
            assert_eq!(got, want, "syscall {nr}");
        }
        // Some that must never be allowed.
        for nr in [
            libc::SYS_mount,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_bpf,
            libc::SYS_keyctl,
            libc::SYS_kexec_load,
            libc::SYS_init_module,
            libc::SYS_io_uring_setup,
            libc::SYS_perf_event_open,
            libc::SYS_reboot,
            libc::SYS_swapon,
            libc::SYS_ptrace,
            libc::SYS_userfaultfd,
            libc::SYS_open_tree,
            libc::SYS_fsopen,
            libc::SYS_pivot_root,
            libc::SYS_clock_settime,
            libc::SYS_get_mempolicy,
        ] {
            assert_eq!(eval(&p, AUDIT_ARCH, nr as u32, 0), RET_EPERM, "{nr}");
        }
    }

    #[test]
    fn argument_rules_and_foreign_calls() {
        let p = default_filter();
        let clone = libc::SYS_clone as u32;
        assert_eq!(
            eval(&p, AUDIT_ARCH, clone, libc::SIGCHLD as u32),
            SECCOMP_RET_ALLOW
        );
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u32;
        assert_eq!(eval(&p, AUDIT_ARCH, clone, thread), SECCOMP_RET_ALLOW);
        for ns in [libc::CLONE_NEWUSER, libc::CLONE_NEWNS, libc::CLONE_NEWNET] {
            assert_eq!(eval(&p, AUDIT_ARCH, clone, ns as u32), RET_EPERM);
        }
        let pers = libc::SYS_personality as u32;
        for ok in PERSONAS {
            assert_eq!(eval(&p, AUDIT_ARCH, pers, ok), SECCOMP_RET_ALLOW);
        }
        // ADDR_NO_RANDOMIZE: no.
        assert_eq!(eval(&p, AUDIT_ARCH, pers, 0x0040000), RET_EPERM);
        let socket = libc::SYS_socket as u32;
        assert_eq!(
            eval(&p, AUDIT_ARCH, socket, libc::AF_INET as u32),
            SECCOMP_RET_ALLOW
        );
        assert_eq!(eval(&p, AUDIT_ARCH, socket, AF_VSOCK), RET_EPERM);
        // Another architecture, or x32 on x86_64.
        assert_eq!(
            eval(&p, 0x4000_0003, libc::SYS_getpid as u32, 0),
            RET_ENOSYS
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(eval(&p, AUDIT_ARCH, 0x4000_0000 | 39, 0), RET_ENOSYS);
    }
}
