//! Process hardening for the box's init, inherited by everything it starts: a seccomp filter
//! against kernel-level escapes and a Docker-like capability set without CAP_SYS_ADMIN,
//! CAP_MKNOD, CAP_SYS_MODULE and friends.
//!
//! No `no_new_privs`: `sudo` inside the box must keep working. The filter is installed while
//! the init still holds CAP_SYS_ADMIN, which the kernel requires in that case.

use caps::{CapSet, Capability};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::{BTreeMap, HashSet};

/// Syscalls a box never needs and that reach host-global kernel state.
const DENIED: &[i64] = &[
    libc::SYS_acct,
    libc::SYS_add_key,
    libc::SYS_bpf,
    libc::SYS_clock_adjtime,
    libc::SYS_clock_settime,
    libc::SYS_delete_module,
    libc::SYS_finit_module,
    libc::SYS_init_module,
    libc::SYS_kexec_file_load,
    libc::SYS_kexec_load,
    libc::SYS_keyctl,
    libc::SYS_request_key,
    libc::SYS_lookup_dcookie,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_mount_setattr,
    libc::SYS_pivot_root,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_perf_event_open,
    libc::SYS_quotactl,
    libc::SYS_reboot,
    libc::SYS_setns,
    libc::SYS_unshare,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_syslog,
    libc::SYS_settimeofday,
    libc::SYS_adjtimex,
    libc::SYS_userfaultfd,
    libc::SYS_vhangup,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_iopl,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ioperm,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_uselib,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_ustat,
    #[cfg(target_arch = "x86_64")]
    libc::SYS_sysfs,
];

/// Namespace flags `clone` may not carry (a new namespace would let box root regain powers).
const NS_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// Capabilities the box keeps (Docker's default set minus CAP_MKNOD).
pub const KEPT_CAPS: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FSETID,
    Capability::CAP_FOWNER,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETPCAP,
    Capability::CAP_SETFCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_NET_RAW,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_KILL,
    Capability::CAP_AUDIT_WRITE,
];

fn arch() -> TargetArch {
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
    #[cfg(not(target_arch = "aarch64"))]
    TargetArch::x86_64
}

fn install(prog: &BpfProgram) -> Result<(), String> {
    let fprog = libc::sock_fprog { len: prog.len() as u16, filter: prog.as_ptr() as *mut libc::sock_filter };
    // SAFETY: fprog points at a valid program that outlives the call; the kernel copies it.
    let rc = unsafe {
        libc::syscall(libc::SYS_seccomp, 1 /* SECCOMP_SET_MODE_FILTER */, 0, &fprog)
    };
    if rc != 0 {
        return Err(format!("install seccomp filter: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// x86_64 processes can call the x32 ABI by setting bit 30 of the syscall number; those calls
/// would pass a filter keyed on x86_64 numbers. Refuse them outright.
fn x32_filter() -> BpfProgram {
    const BPF_LD_W_ABS: u16 = 0x20;
    const BPF_JSET_K: u16 = 0x45;
    const BPF_RET_K: u16 = 0x06;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let f = |code, jt, jf, k| seccompiler::sock_filter { code, jt, jf, k };
    vec![
        f(BPF_LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        f(BPF_JSET_K, 0, 1, 0x4000_0000),
        f(BPF_RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        f(BPF_RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
}

pub fn apply() -> Result<(), String> {
    let (deny, clone3) = programs()?;
    install(&deny)?;
    install(&clone3)?;
    #[cfg(target_arch = "x86_64")]
    install(&x32_filter())?;
    let keep: HashSet<Capability> = KEPT_CAPS.iter().copied().collect();
    for cap in caps::all() {
        // Capabilities this kernel does not know are not in the bounding set to begin with.
        if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
            caps::drop(None, CapSet::Bounding, cap).map_err(|e| format!("drop bounding cap {cap}: {e}"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(|e| format!("clear ambient caps: {e}"))?;
    caps::set(None, CapSet::Inheritable, &keep).map_err(|e| format!("set inheritable caps: {e}"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(|e| format!("set effective caps: {e}"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(|e| format!("set permitted caps: {e}"))?;
    Ok(())
}

/// The two filters: the deny list (EPERM) and the clone3 stub (ENOSYS).
pub fn programs() -> Result<(BpfProgram, BpfProgram), String> {
    let build = |rules: BTreeMap<i64, Vec<SeccompRule>>, action: SeccompAction| -> Result<BpfProgram, String> {
        let f = SeccompFilter::new(rules, SeccompAction::Allow, action, arch()).map_err(|e| e.to_string())?;
        f.try_into().map_err(|e: seccompiler::BackendError| e.to_string())
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for &nr in DENIED {
        rules.insert(nr, vec![]);
    }
    let mut clone_rules = vec![];
    for &flag in NS_FLAGS {
        let cond = SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(flag), flag)
            .map_err(|e| e.to_string())?;
        clone_rules.push(SeccompRule::new(vec![cond]).map_err(|e| e.to_string())?);
    }
    rules.insert(libc::SYS_clone, clone_rules);
    let deny = build(rules, SeccompAction::Errno(libc::EPERM as u32))?;
    let clone3 = build(BTreeMap::from([(libc::SYS_clone3, vec![])]), SeccompAction::Errno(libc::ENOSYS as u32))?;
    Ok((deny, clone3))
}

#[cfg(test)]
mod tests {
    #[test]
    fn filters_compile() {
        let (deny, clone3) = super::programs().unwrap();
        assert!(deny.len() > super::DENIED.len());
        assert!(!clone3.is_empty());
    }
}
