//! Giving back the code pages only start-up used.
//!
//! An idle agent's resident memory is mostly its own binary's clean file
//! pages (BENCHMARKS.md, "Idle RSS: start-up's code pages"): start-up
//! (configuration, migrations, the first connection to the hub) runs code
//! once, and the kernel maps 64 KiB around every page it faults in, so the
//! agent would keep holding what it never runs again until memory runs
//! short. A minute after start, [`release_code_pages`] asks the kernel to
//! reclaim the binary's pages (`MADV_PAGEOUT`, Linux 5.4); what the agent
//! still runs is faulted back in on its next use, so what stays resident
//! is the code it actually runs.
//!
//! Invariant: only read-only mappings of the agent's own executable are
//! advised; they are clean, so nothing is written and nothing is lost (the
//! only unsafe code here is that `madvise` call).

use std::io;
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How long after start the pages are given back: start-up, the first
/// sync and the first rescan of the artifact directories are over.
pub const RELEASE_AFTER: Duration = Duration::from_secs(60);

/// Waits [`RELEASE_AFTER`] (or for shutdown), then calls
/// [`release_code_pages`] once; a kernel without `MADV_PAGEOUT` is noted
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

/// Advises the kernel to reclaim every read-only mapping of this
/// process's executable; returns the bytes of those mappings.
#[allow(unsafe_code)]
pub fn release_code_pages() -> io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut advised = 0;
    for (start, len) in own_read_only_mappings(&maps, &exe) {
        // SAFETY: the range is a whole mapping of this process, read-only
        // and backed by the executable's file: MADV_PAGEOUT only drops its
        // clean pages, which the next access reads back from the file.
        unsafe { rustix::mm::madvise(start as *mut _, len, rustix::mm::Advice::LinuxPageOut)? };
        advised += len;
    }
    Ok(advised)
}

/// `(start, length)` of the mappings in `maps` (the text of
/// `/proc/PID/maps`) that map the file `exe` without write permission.
fn own_read_only_mappings(maps: &str, exe: &Path) -> Vec<(usize, usize)> {
    let exe = exe.as_os_str().to_str().unwrap_or("");
    maps.lines()
        .filter_map(|line| {
            // address perms offset dev inode pathname (which may hold spaces)
            let mut fields = line.splitn(6, ' ');
            let range = fields.next()?;
            let perms = fields.next()?;
            let path = fields.nth(3)?.trim_start();
            if path != exe || perms.contains('w') {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let start = usize::from_str_radix(start, 16).ok()?;
            let end = usize::from_str_radix(end, 16).ok()?;
            (end > start).then_some((start, end - start))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_executables_read_only_mappings_are_chosen() {
        let maps = "\
55c596e95000-55c59704a000 r--p 00000000 fe:00 10338344                   /usr/bin/logbookd
55c59704a000-55c5975dc000 r-xp 001b4000 fe:00 10338344                   /usr/bin/logbookd
55c597601000-55c597608000 rw-p 00769000 fe:00 10338344                   /usr/bin/logbookd
55c597608000-55c597700000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 r-xp 00000000 fe:00 99                         /usr/lib/libc.so.6
7f0000200000-7f0000300000 r-xp 00000000 fe:00 98                         /usr/bin/logbookd (deleted)
7f0000300000-7f0000400000 r-xp 00000000 fe:00 97                         /opt/my robot/logbookd
";
        assert_eq!(
            own_read_only_mappings(maps, Path::new("/usr/bin/logbookd")),
            [(0x55c5_96e9_5000, 0x1b_5000), (0x55c5_9704_a000, 0x59_2000)]
        );
        assert_eq!(
            own_read_only_mappings(maps, Path::new("/opt/my robot/logbookd")),
            [(0x7f00_0030_0000, 0x10_0000)]
        );
    }

    /// Resident kibibytes of this process's executable, from its smaps.
    fn exe_rss_kib() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        let exe = exe.to_str().unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut ours = false;
        let mut kib = 0;
        for line in smaps.lines() {
            if line.starts_with(|c: char| c.is_ascii_hexdigit()) && line.contains('-') {
                ours = line.ends_with(exe);
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
        let before = exe_rss_kib();
        match release_code_pages() {
            Ok(bytes) => assert!(bytes > 0),
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                eprintln!(
                    "NOTICE: this kernel has no MADV_PAGEOUT (before Linux 5.4): not checked"
                );
                return;
            }
            Err(e) => panic!("{e}"),
        }
        let after = exe_rss_kib();
        // What this test and its neighbours run comes back at once; the
        // rest of the test binary stays out.
        assert!(
            after < before,
            "resident {before} KiB before, {after} KiB after"
        );
    }
}
