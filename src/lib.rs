//! logbook: the on-robot session agent (`agent`), the fleet hub (`hub`), and
//! what they share: the versioned wire types (`wire`), configuration
//! loading (`config`) and the consoles' views (`console`).
//!
//! `agent` and `hub` never import each other; the binaries in `src/bin/` are
//! thin shells over this library. `hub` and `dev` (and the crates only they
//! use) are built with the `hub` feature, on by default; the robot's
//! binaries are built without it (README "On a robot").

pub mod agent;
pub mod client;
pub mod config;
pub mod console;
#[cfg(feature = "hub")]
pub mod dev;
pub mod exit;
#[cfg(feature = "hub")]
pub mod hub;
pub mod prom;
pub mod wire;

/// A tiny deterministic generator (xorshift64) for the unit tests that
/// mutate or generate inputs: no dependency, the same cases on every run.
#[cfg(test)]
pub(crate) mod test_rng {
    pub struct Rng(u64);

    impl Rng {
        pub fn new(seed: u64) -> Rng {
            Rng(seed | 1)
        }
        pub fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        pub fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    /// One to four flips, inserts or deletes at random places of `sample`.
    pub fn mutate(rng: &mut Rng, sample: &[u8]) -> Vec<u8> {
        let mut v = sample.to_vec();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(v.len() + 1);
            match rng.below(4) {
                0 if at < v.len() => v[at] ^= 1 << rng.below(8),
                1 => v.insert(at, rng.next() as u8),
                2 if at < v.len() => {
                    v.remove(at);
                }
                // Interesting bytes: delimiters (JSON, syslog, TOML,
                // queries) and msgpack length markers.
                _ => {
                    const SPECIAL: &[u8] =
                        b"<>[]\"\\= \0\xef\xc1\xdc\xdd\xde\xdf\xc6\xdb\xd7\x93\xff";
                    let b = SPECIAL[rng.below(SPECIAL.len())];
                    if at < v.len() {
                        v[at] = b
                    } else {
                        v.push(b)
                    }
                }
            }
        }
        v
    }
}
