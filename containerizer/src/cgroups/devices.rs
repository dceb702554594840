//! Device access control of a task: an allow-list of device rules over "deny everything".
//! cgroup v1 writes them to `devices.deny`/`devices.allow`; cgroup v2 has no device files and
//! takes a `BPF_PROG_TYPE_CGROUP_DEVICE` program instead, assembled here from the same rules.
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::sys::bpf::{self, Insn, R0, R1, R2, R3, R4, R5};

/// Kind of device a rule or a node is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceType {
    /// Any device (rules only).
    #[serde(rename = "a")]
    All,
    #[serde(rename = "c")]
    Char,
    #[serde(rename = "b")]
    Block,
}

impl DeviceType {
    fn letter(self) -> char {
        match self {
            DeviceType::All => 'a',
            DeviceType::Char => 'c',
            DeviceType::Block => 'b',
        }
    }
}

/// One allow rule: type, major and minor (`None` = any), access (a subset of `rwm`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRule {
    #[serde(rename = "type")]
    pub kind: DeviceType,
    pub major: Option<u32>,
    pub minor: Option<u32>,
    pub access: String,
}

impl DeviceRule {
    /// A `rwm` rule on one character device.
    pub fn char_rwm(major: u32, minor: u32) -> Self {
        DeviceRule {
            kind: DeviceType::Char,
            major: Some(major),
            minor: Some(minor),
            access: "rwm".into(),
        }
    }

    /// The line cgroup v1 takes in `devices.allow`, e.g. `c 195:0 rwm`.
    pub fn to_v1(&self) -> String {
        let n = |v: Option<u32>| v.map_or("*".to_string(), |v| v.to_string());
        if self.kind == DeviceType::All {
            return format!("a *:* {}", self.access);
        }
        format!(
            "{} {}:{} {}",
            self.kind.letter(),
            n(self.major),
            n(self.minor),
            self.access
        )
    }

    /// `BPF_DEVCG_ACC_*` bits of the access string.
    fn access_mask(&self) -> i32 {
        self.access.chars().fold(0, |m, c| match c {
            'm' => m | 1,
            'r' => m | 2,
            'w' => m | 4,
            _ => m,
        })
    }
}

/// A device node created in the task's `/dev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceNode {
    /// Absolute path inside the task, under `/dev/`.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: DeviceType,
    pub major: u32,
    pub minor: u32,
    /// Permission bits (e.g. 0o666).
    pub mode: u32,
    /// Owner in the task (default root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
}

/// Devices of a task beyond the default minimal `/dev`: nodes to create and rules to allow.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Devices {
    #[serde(default)]
    pub nodes: Vec<DeviceNode>,
    #[serde(default)]
    pub allow: Vec<DeviceRule>,
}

impl Devices {
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty() && self.allow.is_empty()
    }
}

/// What every task may use: mknod of anything (creating a node is harmless, opening it is
/// what the rules decide), and the nodes of the minimal `/dev` (null, zero, full, random,
/// urandom, tty, console, ptmx) and the pseudo terminals (136:*).
pub fn default_allow() -> Vec<DeviceRule> {
    let any = |kind| DeviceRule {
        kind,
        major: None,
        minor: None,
        access: "m".into(),
    };
    let mut v = vec![any(DeviceType::Char), any(DeviceType::Block)];
    for (maj, min) in [
        (1, 3),
        (1, 5),
        (1, 7),
        (1, 8),
        (1, 9),
        (5, 0),
        (5, 1),
        (5, 2),
    ] {
        v.push(DeviceRule::char_rwm(maj, min));
    }
    v.push(DeviceRule {
        kind: DeviceType::Char,
        major: Some(136),
        minor: None,
        access: "rwm".into(),
    });
    v
}

/// Assembles a cgroup device program that allows exactly `rules` (first match wins) and
/// denies the rest.
///
/// The context is `struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; }`, with
/// the device type in the low 16 bits of `access_type` and the access bits in the high 16.
/// Registers: r2 type, r3 access, r4 major, r5 minor; r1 is scratch once they are loaded.
pub fn device_program(rules: &[DeviceRule]) -> Vec<Insn> {
    let mut p = vec![
        Insn::ldx_w(R2, R1, 0),
        Insn::and32_imm(R2, 0xffff),
        Insn::ldx_w(R3, R1, 0),
        Insn::rsh32_imm(R3, 16),
        Insn::ldx_w(R4, R1, 4),
        Insn::ldx_w(R5, R1, 8),
    ];
    for r in rules {
        let mut block = vec![];
        match r.kind {
            DeviceType::All => {}
            DeviceType::Block => block.push(Insn::jne_imm(R2, 1, 0)),
            DeviceType::Char => block.push(Insn::jne_imm(R2, 2, 0)),
        }
        let mask = r.access_mask();
        if mask & 7 != 7 {
            // Allowed only if every requested access bit is in the rule.
            block.push(Insn::mov32_reg(R1, R3));
            block.push(Insn::and32_imm(R1, mask));
            block.push(Insn::jne_reg(R1, R3, 0));
        }
        if let Some(m) = r.major {
            block.push(Insn::jne_imm(R4, m as i32, 0));
        }
        if let Some(m) = r.minor {
            block.push(Insn::jne_imm(R5, m as i32, 0));
        }
        block.push(Insn::mov64_imm(R0, 1));
        block.push(Insn::exit());
        // Every failed test skips to the end of this rule's block.
        let len = block.len();
        for (i, insn) in block.iter_mut().enumerate() {
            if insn.is_jump() {
                insn.off = (len - i - 1) as i16;
            }
        }
        p.extend(block);
    }
    p.push(Insn::mov64_imm(R0, 0));
    p.push(Insn::exit());
    p
}

/// Loads the device program for `rules` and attaches it to the cgroup v2 directory `dir`.
pub fn attach_v2(dir: &Path, rules: &[DeviceRule]) -> std::io::Result<()> {
    let prog = bpf::prog_load(
        bpf::PROG_TYPE_CGROUP_DEVICE,
        &device_program(rules),
        "caisson_dev",
    )?;
    bpf::prog_attach_cgroup(dir, &prog, bpf::ATTACH_CGROUP_DEVICE, bpf::F_ALLOW_MULTI)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines() {
        let d = default_allow();
        assert_eq!(d[0].to_v1(), "c *:* m");
        assert_eq!(d[1].to_v1(), "b *:* m");
        assert_eq!(d.last().unwrap().to_v1(), "c 136:* rwm");
        assert_eq!(DeviceRule::char_rwm(195, 3).to_v1(), "c 195:3 rwm");
    }

    /// Runs the assembled program on a context, as the kernel would (only the instructions
    /// the builder emits), to check the jumps and the decision logic without root.
    fn eval(p: &[Insn], kind: u32, access: u32, major: u32, minor: u32) -> u64 {
        let ctx = [(access << 16) | kind, major, minor];
        let mut r = [0u64; 11];
        let mut pc = 0usize;
        loop {
            let i = p[pc];
            let (dst, src) = ((i.regs & 0xf) as usize, (i.regs >> 4) as usize);
            pc += 1;
            match i.code {
                0x61 => r[dst] = ctx[(r[src] as usize + i.off as usize) / 4] as u64,
                0xbc => r[dst] = r[src] & 0xffff_ffff,
                0xb7 => r[dst] = i.imm as i64 as u64,
                0x54 => r[dst] = (r[dst] & i.imm as u32 as u64) & 0xffff_ffff,
                0x74 => r[dst] = ((r[dst] as u32) >> i.imm) as u64,
                0x55 if r[dst] != i.imm as i64 as u64 => pc += i.off as usize,
                0x5d if r[dst] != r[src] => pc += i.off as usize,
                0x55 | 0x5d => {}
                0x95 => return r[0],
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn program_decisions() {
        let mut rules = default_allow();
        rules.push(DeviceRule::char_rwm(195, 1));
        let p = device_program(&rules);
        let (c, b) = (2, 1);
        let (m, r, w) = (1, 2, 4);
        // Pointer reset by r1 = ctx before use: the evaluator starts with r1 = 0 (offset 0).
        assert_eq!(eval(&p, c, r | w, 1, 3), 1, "null rw");
        assert_eq!(eval(&p, c, r, 195, 1), 1, "allocated GPU");
        assert_eq!(eval(&p, c, r, 195, 2), 0, "other GPU");
        assert_eq!(eval(&p, c, m, 195, 2), 1, "mknod anything");
        assert_eq!(eval(&p, b, m, 8, 0), 1, "mknod block");
        assert_eq!(eval(&p, b, r, 8, 0), 0, "block read");
        assert_eq!(eval(&p, c, r | w, 136, 7), 1, "pty");
        assert_eq!(eval(&p, c, r | m, 195, 2), 0, "read+mknod needs both");
        assert_eq!(eval(&p, c, r, 1, 1), 0, "/dev/mem");
    }
}
