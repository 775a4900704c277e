//! The realistic robot log mix the sync benchmarks share: `line(i)` is a
//! 150–300 byte JSON line, distinct for every `i`, of the kind a tracing
//! subscriber writes (the same generator `sync_bench` carries inline; it
//! can `mod common;` and drop its copy unchanged).

const LEVELS: &[&str] = &[
    "debug", "info", "info", "info", "warn", "debug", "error", "trace",
];
const MODULES: &[&str] = &[
    "nav::planner",
    "nav::localization",
    "perception.lidar",
    "perception.camera",
    "drive::motor_left",
    "drive::motor_right",
    "arm.controller",
    "battery",
];

/// A realistic robot log line of 150–300 bytes, distinct for every `i`.
pub fn line(i: u64) -> String {
    let level = LEVELS[(i % LEVELS.len() as u64) as usize];
    let module = MODULES[((i / 3) % MODULES.len() as u64) as usize];
    format!(
        r#"{{"level":"{level}","target":"{module}","msg":"cycle {i} done in {}us, queue depth {}, pose x={}.{} y={}.{}","fields":{{"seq":{i},"temp_c":{}.{},"mission":"m-{}"}}}}"#,
        (i * 37) % 5000,
        i % 17,
        (i * 13) % 200,
        i % 1000,
        (i * 7) % 150,
        (i * 3) % 1000,
        40 + i % 30,
        i % 10,
        i / 10_000
    )
}
