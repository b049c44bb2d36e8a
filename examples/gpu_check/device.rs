//! Timing and memory measurements on the CUDA device.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;

/// Waits for the device's queued work (timings and memory readings need it).
pub fn sync(device: &Device) -> anyhow::Result<()> {
    device.synchronize()?;
    Ok(())
}

/// Median wall time of `f` over `iters` runs after one warm-up, synchronised.
pub fn time_it(
    dev: &Device,
    iters: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    f()?;
    sync(dev)?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        sync(dev)?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// Samples the device's used memory every millisecond while alive.
pub struct MemPeak {
    stop: Arc<AtomicBool>,
    peak: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemPeak {
    pub fn start(dev: &Device) -> Self {
        let Device::Cuda(cuda) = dev else { unreachable!() };
        let ctx = cuda.cuda_stream().context().clone();
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicUsize::new(0));
        let (s, p) = (stop.clone(), peak.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok((free, total)) = ctx.mem_get_info() {
                    p.fetch_max(total - free, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Self { stop, peak, thread: Some(thread) }
    }

    pub fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed)
    }
}

/// GPU memory in use, in bytes (all processes).
pub fn used_memory(dev: &Device) -> anyhow::Result<usize> {
    let Device::Cuda(cuda) = dev else { unreachable!() };
    let (free, total) = cuda.cuda_stream().context().mem_get_info()?;
    Ok(total - free)
}

pub fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}
