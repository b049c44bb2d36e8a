//! Process-wide CPU settings: the worker threads and the allocator.

use crate::{Error, Result};

/// Sets up the CPU side of the process; returns the number of worker threads. Programs opt in
/// (sd-cli and sd_py call it before loading a CPU pipeline); sd-core never calls it, so loading a
/// pipeline leaves process-wide state alone. Without it candle's and rayon's defaults apply: the
/// images are the same, only speed and memory use differ. Call it once, early: the thread pool
/// can only be set up before its first use.
///
/// * Threads: `threads`, else `RAYON_NUM_THREADS`, else one per core. Every CPU kernel of
///   sd-core (GEMMs included: MKL runs sequentially inside rayon tasks) uses this pool. If the
///   pool was already built (by the embedding program), it is kept as it is. More than
///   [`max_threads`] is refused: each thread costs a stack and the work is split per thread, so
///   a count far above the cores only slows the run down (100 000 threads hang in spawning).
/// * Allocator (glibc): buffers the size of activations (tens to hundreds of MB) are kept by
///   malloc for reuse instead of being returned to the kernel at every free, which otherwise
///   costs a page fault per 4 KiB and a zero fill every time a layer allocates its output.
pub fn init_cpu(threads: Option<usize>) -> Result<usize> {
    let from_env = || std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.trim().parse().ok());
    let (requested, source) = match threads {
        Some(n) => (Some(n), "--threads"),
        None => (from_env(), "RAYON_NUM_THREADS"),
    };
    if threads == Some(0) {
        return Err(Error::invalid("--threads must be at least 1"));
    }
    if let Some(n) = requested.filter(|&n| n > max_threads()) {
        return Err(Error::invalid(format!(
            "{source} {n} is far above this machine's {} cores: at most {} threads",
            cores(),
            max_threads()
        )));
    }
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        builder = builder.num_threads(n);
    }
    // Err means a global pool exists already; using it is the right thing then.
    let _ = builder.build_global();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // Safety: mallopt only changes allocator tuning parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
    Ok(rayon::current_num_threads())
}

/// The most worker threads [`init_cpu`] takes: 4 per core (more only adds switching and
/// per-thread buffers).
pub fn max_threads() -> usize {
    4 * cores()
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Whether the on/off variable `name` (`SD_MAP_WEIGHTS`, `SD_CONV_WINOGRAD`, `SD_CPU_AMX`,
/// `SD_CPU_AVX512BF16`) turns its feature off: it says `0`, spaces aside. Unset or any other
/// value leaves the feature on.
pub(crate) fn switched_off(name: &str) -> bool {
    says_off(std::env::var(name).ok().as_deref())
}

fn says_off(value: Option<&str>) -> bool {
    value.map(str::trim) == Some("0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_0_switches_off() {
        assert!(!says_off(None));
        assert!(!says_off(Some("1")));
        assert!(says_off(Some("0")));
        assert!(says_off(Some(" 0 ")));
    }
}
