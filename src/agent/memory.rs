//! Giving back the code pages only start-up used.
//!
//! An idle agent's resident memory is mostly clean file pages: its own
//! binary's and the C library's (BENCHMARKS.md, "Idle RSS: start-up's code
//! pages"). Start-up (configuration, migrations, the first connection to
//! the hub) runs code once, and the kernel maps 64 KiB around every page it
//! faults in, so the agent would keep holding what it never runs again
//! until memory runs short. A minute after start, [`release_code_pages`]
//! drops this process's mappings of those pages (`MADV_DONTNEED`); the
//! pages stay in the page cache, and what the agent still runs is mapped
//! again on its next use (a minor fault, no read from the disk), so what
//! stays resident is the code it actually runs.
//!
//! Invariant: only read-only private mappings of files that were mapped
//! before `main` ran (the executable, the C library, the loader: objects
//! that are never unloaded, so the range cannot become something else
//! under us) and that hold no private copy of a page (`Anonymous: 0 kB`
//! in smaps: never written, unlike the relocated RELRO pages) are advised.
//! Dropping such a mapping's pages loses nothing: each one is the file's
//! (the only unsafe code here is that `madvise` call).

use std::io;
use std::sync::OnceLock;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long after start the pages are given back: start-up, the first
/// sync and the first rescan of the artifact directories are over.
pub const RELEASE_AFTER: Duration = Duration::from_secs(60);

/// The files mapped when [`note_start_mappings`] ran.
static START_FILES: OnceLock<Vec<String>> = OnceLock::new();

/// Notes the files this process maps now, before anything could load a
/// library at run time: only these are given back later. Call first thing
/// in `main`; without it only the executable is.
pub fn note_start_mappings() {
    if let Ok(maps) = std::fs::read_to_string("/proc/self/maps") {
        let files = maps
            .lines()
            .filter_map(|l| Mapping::parse(l).map(|m| m.path.to_owned()))
            .filter(|p| p.starts_with('/'))
            .collect();
        let _ = START_FILES.set(files);
    }
}

/// Waits [`RELEASE_AFTER`] (or for shutdown), then calls
/// [`release_code_pages`] once; a kernel that refuses the advice is noted
/// at debug level and changes nothing else.
pub async fn release_after_start(shutdown: CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = tokio::time::sleep(RELEASE_AFTER) => {}
    }
    match tokio::task::spawn_blocking(release_code_pages).await {
        Ok(Ok(bytes)) => tracing::debug!("gave back up to {bytes} bytes of start-up code pages"),
        Ok(Err(e)) => tracing::debug!("start-up code pages not given back: {e}"),
        Err(e) => tracing::debug!("start-up code pages not given back: {e}"),
    }
}

/// Drops this process's mappings of the clean read-only pages of the
/// files mapped at start (see the module's invariant); returns the bytes
/// of the mappings advised.
pub fn release_code_pages() -> io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let exe = exe.to_str().unwrap_or_default();
    release_mappings_of(|path| {
        path == exe
            || START_FILES
                .get()
                .is_some_and(|files| files.iter().any(|f| f == path))
    })
}

/// [`release_code_pages`] for the files `never_unloaded` accepts: only
/// files that stay mapped for the life of the process may be accepted.
#[allow(unsafe_code)]
fn release_mappings_of(never_unloaded: impl Fn(&str) -> bool) -> io::Result<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut advised = 0;
    for (start, len) in clean_read_only_mappings(&smaps, never_unloaded) {
        // SAFETY: the range is a whole private read-only mapping of a file
        // that stays mapped for the life of the process, and none of its
        // pages is a private copy: MADV_DONTNEED only unmaps the file's
        // own pages, and the next access maps the same bytes again.
        unsafe { rustix::mm::madvise(start as *mut _, len, rustix::mm::Advice::LinuxDontNeed)? };
        advised += len;
    }
    Ok(advised)
}

/// One line of `/proc/PID/maps` (or a mapping's first line in smaps).
struct Mapping<'a> {
    start: usize,
    end: usize,
    perms: &'a str,
    path: &'a str,
}

impl<'a> Mapping<'a> {
    fn parse(line: &'a str) -> Option<Mapping<'a>> {
        // address perms offset dev inode pathname (which may hold spaces)
        let mut fields = line.splitn(6, ' ');
        let (start, end) = fields.next()?.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        let perms = fields.next()?;
        if perms.len() != 4 {
            return None;
        }
        let path = fields.nth(3).unwrap_or("").trim_start();
        Some(Mapping {
            start,
            end,
            perms,
            path,
        })
    }
}

/// `(start, length)` of the mappings in `smaps` (the text of
/// `/proc/PID/smaps`) that map a file `keep` accepts, privately, without
/// write permission, with no anonymous (copied) page.
fn clean_read_only_mappings(smaps: &str, keep: impl Fn(&str) -> bool) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        if let Some(m) = Mapping::parse(line) {
            let chosen = m.perms.starts_with('r')
                && !m.perms.contains('w')
                && m.perms.ends_with('p')
                && m.path.starts_with('/')
                && keep(m.path)
                && m.end > m.start;
            current = chosen.then_some((m.start, m.end - m.start));
        } else if let Some(kib) = line.strip_prefix("Anonymous:") {
            let clean = kib.trim().trim_end_matches("kB").trim() == "0";
            if let Some(range) = current.take().filter(|_| clean) {
                out.push(range);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An smaps entry: the mapping's line, then the two fields read.
    fn entry(line: &str, anon_kib: u64) -> String {
        format!("{line}\nSize:                 64 kB\nRss:                  8 kB\nAnonymous:        {anon_kib} kB\nVmFlags: rd mr mw me\n")
    }

    #[test]
    fn only_clean_read_only_mappings_of_start_files_are_chosen() {
        let smaps = [
            entry("55c596e95000-55c59704a000 r--p 00000000 fe:00 10338344                   /usr/bin/logbookd", 0),
            entry("55c59704a000-55c5975dc000 r-xp 001b4000 fe:00 10338344                   /usr/bin/logbookd", 0),
            // RELRO: read-only now, but its relocated pages are copies.
            entry("55c5975dc000-55c597601000 r--p 00746000 fe:00 10338344                   /usr/bin/logbookd", 148),
            entry("55c597601000-55c597608000 rw-p 00769000 fe:00 10338344                   /usr/bin/logbookd", 28),
            entry("55c597608000-55c597700000 rw-p 00000000 00:00 0                          [heap]", 900),
            entry("7f0000000000-7f0000100000 r-xp 00000000 fe:00 99                         /usr/lib/libc.so.6", 0),
            // Shared, not private: not this process's to drop.
            entry("7f0000100000-7f0000180000 r--s 00000000 fe:00 96                         /dev/shm/x", 0),
            // Loaded at run time: could be unloaded and the range reused.
            entry("7f0000180000-7f0000190000 r-xp 00000000 fe:00 95                         /usr/lib/libnss_dns.so.2", 0),
            entry("7f0000200000-7f0000300000 r-xp 00000000 fe:00 98                         /usr/bin/logbookd (deleted)", 0),
            entry("7f0000300000-7f0000400000 r-xp 00000000 fe:00 97                         /opt/my robot/logbookd", 0),
            entry("7ffd5e9f3000-7ffd5e9f5000 r-xp 00000000 00:00 0                          [vdso]", 0),
        ]
        .concat();
        let start = ["/usr/bin/logbookd", "/usr/lib/libc.so.6", "/dev/shm/x"];
        assert_eq!(
            clean_read_only_mappings(&smaps, |p| start.contains(&p)),
            [
                (0x55c5_96e9_5000, 0x1b_5000),
                (0x55c5_9704_a000, 0x59_2000),
                (0x7f00_0000_0000, 0x10_0000)
            ]
        );
        assert_eq!(
            clean_read_only_mappings(&smaps, |p| p == "/opt/my robot/logbookd"),
            [(0x7f00_0030_0000, 0x10_0000)]
        );
    }

    /// Resident kibibytes of this process's mappings of the file whose
    /// path ends with `name`, from its smaps.
    fn resident_kib(name: &str) -> u64 {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut ours = false;
        let mut kib = 0;
        for line in smaps.lines() {
            if let Some(m) = Mapping::parse(line) {
                ours = m.path.ends_with(name);
            } else if let Some(rest) = line.strip_prefix("Rss:").filter(|_| ours) {
                kib += rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap();
            }
        }
        kib
    }

    #[test]
    fn the_pages_are_given_back() {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_str().unwrap().to_owned();
        let libc = "/libc.so.6";
        let before = (resident_kib(&exe), resident_kib(libc));
        // Not `release_code_pages` after `note_start_mappings`: a test
        // process is past its start. Its executable and the C library are
        // never unloaded, so those two may be given back.
        let advised = release_mappings_of(|p| p == exe || p.ends_with(libc)).unwrap();
        assert!(advised > 0);
        let after = (resident_kib(&exe), resident_kib(libc));
        // What this test and its neighbours run comes back at once; the
        // rest stays out.
        assert!(
            after.0 < before.0,
            "executable: {before:?} KiB before, {after:?} after"
        );
        if before.1 > 0 {
            assert!(
                after.1 < before.1,
                "libc: {before:?} KiB before, {after:?} after"
            );
        }
        // And everything still runs: threads, the allocator, files, text.
        let read = std::thread::spawn(|| std::fs::read_to_string("/proc/self/status").unwrap())
            .join()
            .unwrap();
        let words: Vec<String> = read.split_whitespace().map(str::to_uppercase).collect();
        assert!(words.iter().any(|w| w == "VMRSS:"), "{words:?}");
    }
}
