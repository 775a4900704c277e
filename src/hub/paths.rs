//! Validation of artifact paths sent by devices (`Upload-Metadata: path`).
//!
//! Invariant: a path that passes [`validate_artifact_path`] is relative,
//! `/`-separated, has no empty, `.` or `..` component, no NUL or control
//! character and no backslash. Artifacts are stored under random blob
//! names, so even a valid path never names a file on the hub's disk.

/// Longest accepted artifact path, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;

/// Checks a device-supplied artifact path, saying what is wrong with it.
pub fn validate_artifact_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("artifact path is empty".into());
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(format!(
            "artifact path is longer than {MAX_PATH_BYTES} bytes"
        ));
    }
    if path.starts_with('/') {
        return Err(format!("artifact path {path:?} is absolute"));
    }
    if let Some(c) = path.chars().find(|c| c.is_control() || *c == '\\') {
        return Err(format!(
            "artifact path {:?} contains the forbidden character {:?}",
            path.escape_debug().to_string(),
            c
        ));
    }
    for part in path.split('/') {
        match part {
            "" => return Err(format!("artifact path {path:?} has an empty component")),
            "." | ".." => {
                return Err(format!("artifact path {path:?} contains {part:?}"));
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(path: &str, ok: bool) {
        assert_eq!(validate_artifact_path(path).is_ok(), ok, "{path:?}");
    }

    #[test]
    fn paths() {
        check("logs/session.log", true);
        check("screenshots/final.png", true);
        check("a b/ü.txt", true);
        check("..hidden-ish/x", true);
        check("", false);
        check("/etc/passwd", false);
        check("../escape", false);
        check("a/../../b", false);
        check("a/./b", false);
        check("a//b", false);
        check("a/", false);
        check("nul\0byte", false);
        check("back\\slash", false);
        check("new\nline", false);
        check(&"x".repeat(MAX_PATH_BYTES + 1), false);
    }
}
