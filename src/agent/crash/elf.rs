//! What a core file says about its crash, from its ELF notes: the signal
//! and the crashing thread's id (`NT_PRSTATUS`), the process id, command
//! name and arguments (`NT_PRPSINFO`). ELF32 and ELF64, either byte order,
//! as Linux writes them for every architecture a robot runs.
//!
//! Only the start of the file is read (the kernel writes the ELF header,
//! the program headers and the notes first, then the memory); a note
//! segment that runs past the bytes given is read as far as it goes.
//!
//! Invariant: pure and panic-free on any input (fuzzed by the fuzz crate's
//! `core_notes` target): every offset is checked against the input before
//! it is read, and at most [`MAX_NOTES`] notes are looked at.

/// Bytes of a core file [`parse`] needs at most (the caller reads this
/// much of the file, or less when it is shorter).
pub const PREFIX: usize = 1 << 20;
/// Most notes looked at (a core has one per thread and kind).
pub const MAX_NOTES: usize = 4096;

const ET_CORE: u16 = 4;
const PT_NOTE: u32 = 4;
const NT_PRSTATUS: u32 = 1;
const NT_PRPSINFO: u32 = 3;
/// `pr_fname[16]` and `pr_psargs[80]` end `struct elf_prpsinfo` on every
/// architecture; what comes before them differs (the width of `pr_flag`
/// and of the uid fields), so they are read from the end.
const FNAME: usize = 16;
const PSARGS: usize = 80;

/// What the notes of a core file say; a field the file does not hold is
/// `None`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CoreNotes {
    /// The signal that killed the process (`si_signo`, else `pr_cursig`).
    pub signal: Option<i32>,
    /// The process id (`NT_PRPSINFO`'s `pr_pid`, else the crashing
    /// thread's `pr_pid` from `NT_PRSTATUS`).
    pub pid: Option<u32>,
    /// The command name (`pr_fname`, as `/proc/<pid>/comm`: 15 bytes).
    pub command: Option<String>,
    /// The first 80 bytes of the command line, arguments separated by
    /// spaces.
    pub args: Option<String>,
}

struct Elf<'a> {
    b: &'a [u8],
    wide: bool,
    big: bool,
}

impl Elf<'_> {
    fn bytes(&self, at: usize, n: usize) -> Option<&[u8]> {
        self.b.get(at..at.checked_add(n)?)
    }
    fn u16(&self, at: usize) -> Option<u16> {
        let b: [u8; 2] = self.bytes(at, 2)?.try_into().ok()?;
        Some(if self.big {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }
    fn u32(&self, at: usize) -> Option<u32> {
        let b: [u8; 4] = self.bytes(at, 4)?.try_into().ok()?;
        Some(if self.big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }
    fn u64(&self, at: usize) -> Option<u64> {
        let b: [u8; 8] = self.bytes(at, 8)?.try_into().ok()?;
        Some(if self.big {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        })
    }
    /// A word: 8 bytes in ELF64, 4 in ELF32.
    fn word(&self, at: usize) -> Option<usize> {
        let v = if self.wide {
            self.u64(at)?
        } else {
            u64::from(self.u32(at)?)
        };
        usize::try_from(v).ok()
    }
}

/// The notes of a core file from its first bytes; `None` when they are not
/// the start of an ELF core file.
pub fn parse(prefix: &[u8]) -> Option<CoreNotes> {
    if prefix.get(..4)? != b"\x7fELF" {
        return None;
    }
    let wide = match prefix.get(4)? {
        1 => false,
        2 => true,
        _ => return None,
    };
    let big = match prefix.get(5)? {
        1 => false,
        2 => true,
        _ => return None,
    };
    let elf = Elf {
        b: prefix,
        wide,
        big,
    };
    if elf.u16(16)? != ET_CORE {
        return None;
    }
    let (phoff, phentsize, phnum) = if wide {
        (elf.word(32)?, elf.u16(54)?, elf.u16(56)?)
    } else {
        (elf.word(28)?, elf.u16(42)?, elf.u16(44)?)
    };
    let mut notes = CoreNotes::default();
    let mut seen = 0usize;
    for i in 0..usize::from(phnum) {
        let ph = phoff.checked_add(i.checked_mul(usize::from(phentsize))?)?;
        let Some(kind) = elf.u32(ph) else { break };
        if kind != PT_NOTE {
            continue;
        }
        let (offset, size) = if wide {
            (elf.word(ph + 8)?, elf.word(ph + 32)?)
        } else {
            (elf.word(ph + 4)?, elf.word(ph + 16)?)
        };
        let start = offset.min(prefix.len());
        let end = offset.saturating_add(size).min(prefix.len());
        read_notes(&elf, start, end, &mut notes, &mut seen);
        if seen >= MAX_NOTES {
            break;
        }
    }
    Some(notes)
}

/// Reads the notes in `elf.b[at..end]` into `out`; the first of each kind
/// counts (the kernel writes the crashing thread's status first).
fn read_notes(elf: &Elf<'_>, mut at: usize, end: usize, out: &mut CoreNotes, seen: &mut usize) {
    let align4 = |n: usize| n.checked_add(3).map(|n| n & !3);
    let mut status_pid = None;
    while *seen < MAX_NOTES && at.saturating_add(12) <= end {
        *seen += 1;
        let (Some(namesz), Some(descsz), Some(kind)) =
            (elf.u32(at), elf.u32(at + 4), elf.u32(at + 8))
        else {
            return;
        };
        let Some(desc_at) = align4(namesz as usize).and_then(|n| (at + 12).checked_add(n)) else {
            return;
        };
        let Some(next) = align4(descsz as usize).and_then(|n| desc_at.checked_add(n)) else {
            return;
        };
        let desc = desc_at
            .checked_add(descsz as usize)
            .filter(|e| *e <= end)
            .and_then(|_| elf.bytes(desc_at, descsz as usize));
        if let Some(desc) = desc {
            let d = Elf {
                b: desc,
                wide: elf.wide,
                big: elf.big,
            };
            match kind {
                NT_PRSTATUS if status_pid.is_none() => {
                    // struct elf_prstatus: elf_siginfo (3 ints), short
                    // pr_cursig, then two words of signal masks, then pr_pid.
                    let signo = d.u32(0).map(|s| s as i32).filter(|s| *s > 0);
                    let cursig = d.u16(12).map(i32::from).filter(|s| *s > 0);
                    out.signal = out.signal.or(signo).or(cursig);
                    let pid_at = if elf.wide { 32 } else { 24 };
                    status_pid = Some(d.u32(pid_at));
                }
                NT_PRPSINFO if out.command.is_none() && desc.len() >= FNAME + PSARGS + 16 => {
                    let names = desc.len() - FNAME - PSARGS;
                    // pr_pid, pr_ppid, pr_pgrp, pr_sid come right before.
                    out.pid = d.u32(names - 16).filter(|p| *p > 0);
                    out.command = c_string(&desc[names..names + FNAME]);
                    out.args = c_string(&desc[names + FNAME..]);
                }
                _ => {}
            }
        }
        if next <= at {
            return;
        }
        at = next;
    }
    if out.pid.is_none() {
        out.pid = status_pid.flatten().filter(|p| *p > 0);
    }
}

/// Text up to the first NUL, trailing spaces cut; `None` when empty.
fn c_string(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    let s = String::from_utf8_lossy(&b[..end]).trim_end().to_owned();
    (!s.is_empty()).then_some(s)
}

/// The name of a Linux signal (`SIGSEGV`), or `signal N`.
pub fn signal_name(signal: i32) -> String {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    usize::try_from(signal)
        .ok()
        .and_then(|s| s.checked_sub(1))
        .and_then(|i| NAMES.get(i))
        .map_or_else(|| format!("signal {signal}"), |n| (*n).to_owned())
}

/// Runs [`parse`] on fuzzer input (the fuzz crate's `core_notes` target).
pub fn fuzz_one(data: &[u8]) {
    let _ = parse(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal core as the kernel lays it out: ELF header, one PT_NOTE
    /// program header, then NT_PRSTATUS and NT_PRPSINFO notes.
    fn core(
        wide: bool,
        big: bool,
        signal: u32,
        tid: u32,
        pid: u32,
        comm: &str,
        args: &str,
    ) -> Vec<u8> {
        let put16 = |v: &mut Vec<u8>, x: u16| {
            v.extend_from_slice(&if big {
                x.to_be_bytes()
            } else {
                x.to_le_bytes()
            })
        };
        let put32 = |v: &mut Vec<u8>, x: u32| {
            v.extend_from_slice(&if big {
                x.to_be_bytes()
            } else {
                x.to_le_bytes()
            })
        };
        let word = |v: &mut Vec<u8>, x: u64| {
            if wide {
                v.extend_from_slice(&if big {
                    x.to_be_bytes()
                } else {
                    x.to_le_bytes()
                })
            } else {
                put32(v, x as u32)
            }
        };
        // The notes.
        let mut notes = Vec::new();
        let mut note = |kind: u32, desc: Vec<u8>| {
            put32(&mut notes, 5);
            put32(&mut notes, desc.len() as u32);
            put32(&mut notes, kind);
            notes.extend_from_slice(b"CORE\0\0\0\0");
            let pad = (4 - desc.len() % 4) % 4;
            notes.extend_from_slice(&desc);
            notes.extend(std::iter::repeat_n(0, pad));
        };
        let mut status = Vec::new();
        put32(&mut status, signal);
        put32(&mut status, 0);
        put32(&mut status, 0);
        put16(&mut status, signal as u16);
        put16(&mut status, 0);
        word(&mut status, 0);
        word(&mut status, 0);
        put32(&mut status, tid);
        status.resize(if wide { 336 } else { 148 }, 0);
        note(NT_PRSTATUS, status);
        let mut info = vec![b'R', 0, 0, 0];
        if wide {
            info.extend_from_slice(&[0; 4]);
            word(&mut info, 0);
            put32(&mut info, 1000);
            put32(&mut info, 1000);
        } else {
            word(&mut info, 0);
            put16(&mut info, 1000);
            put16(&mut info, 1000);
        }
        put32(&mut info, pid);
        put32(&mut info, 1);
        put32(&mut info, pid);
        put32(&mut info, pid);
        let mut fname = comm.as_bytes().to_vec();
        fname.resize(FNAME, 0);
        info.extend_from_slice(&fname);
        let mut psargs = args.as_bytes().to_vec();
        psargs.resize(PSARGS, 0);
        info.extend_from_slice(&psargs);
        note(NT_PRPSINFO, info);
        // Header and one program header.
        let (ehsize, phentsize) = if wide { (64u64, 56u16) } else { (52, 32) };
        let mut v = vec![
            0x7f,
            b'E',
            b'L',
            b'F',
            if wide { 2 } else { 1 },
            if big { 2 } else { 1 },
            1,
        ];
        v.resize(16, 0);
        put16(&mut v, ET_CORE);
        put16(&mut v, 62);
        put32(&mut v, 1);
        word(&mut v, 0); // entry
        word(&mut v, ehsize); // phoff
        word(&mut v, 0); // shoff
        put32(&mut v, 0);
        put16(&mut v, ehsize as u16);
        put16(&mut v, phentsize);
        put16(&mut v, 1);
        put16(&mut v, 0);
        put16(&mut v, 0);
        put16(&mut v, 0);
        assert_eq!(v.len() as u64, ehsize);
        let notes_at = ehsize + u64::from(phentsize);
        put32(&mut v, PT_NOTE);
        if wide {
            put32(&mut v, 0);
            word(&mut v, notes_at);
            word(&mut v, 0);
            word(&mut v, 0);
            word(&mut v, notes.len() as u64);
            word(&mut v, 0);
            word(&mut v, 0);
        } else {
            word(&mut v, notes_at);
            word(&mut v, 0);
            word(&mut v, 0);
            word(&mut v, notes.len() as u64);
            word(&mut v, 0);
            put32(&mut v, 0);
            put32(&mut v, 0);
        }
        assert_eq!(v.len() as u64, notes_at);
        v.extend_from_slice(&notes);
        v
    }

    #[test]
    fn every_class_and_byte_order_reads_the_same() {
        for wide in [true, false] {
            for big in [false, true] {
                let c = core(
                    wide,
                    big,
                    11,
                    4243,
                    4242,
                    "planner",
                    "/usr/bin/planner --map a",
                );
                assert_eq!(
                    parse(&c),
                    Some(CoreNotes {
                        signal: Some(11),
                        pid: Some(4242),
                        command: Some("planner".into()),
                        args: Some("/usr/bin/planner --map a".into()),
                    }),
                    "wide {wide} big {big}"
                );
            }
        }
    }

    #[test]
    fn a_cut_note_segment_keeps_what_it_holds() {
        let c = core(true, false, 6, 7, 7, "x", "x");
        // Cut inside NT_PRPSINFO: the status note is still read.
        let cut = &c[..c.len() - 40];
        let n = parse(cut).unwrap();
        assert_eq!(n.signal, Some(6));
        assert_eq!(n.pid, Some(7));
        assert_eq!(n.command, None);
    }

    #[test]
    fn other_files_are_not_cores() {
        assert_eq!(parse(b""), None);
        assert_eq!(parse(b"core dumped"), None);
        let mut exe = core(true, false, 11, 1, 1, "a", "a");
        exe[16] = 2; // ET_EXEC
        assert_eq!(parse(&exe), None);
    }

    #[test]
    fn no_input_panics() {
        let base = core(true, false, 11, 1, 2, "a", "b");
        let mut rng = crate::test_rng::Rng::new(16);
        for _ in 0..20_000 {
            let mut c = base.clone();
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(c.len());
                c[i] = rng.next() as u8;
            }
            c.truncate(rng.below(c.len() + 1));
            let _ = parse(&c);
        }
    }

    #[test]
    fn signals_have_names() {
        assert_eq!(signal_name(11), "SIGSEGV");
        assert_eq!(signal_name(6), "SIGABRT");
        assert_eq!(signal_name(0), "signal 0");
        assert_eq!(signal_name(64), "signal 64");
    }
}
