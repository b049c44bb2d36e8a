//! The AMX micro-kernel: a 32x32 block of C in four tiles (tmm0-3), two A tiles (tmm4-5) and
//! two B tiles (tmm6-7) per step of 32 `k`.

/// Whether this CPU and OS run AMX bf16 tiles for this process. Asks the kernel for the tile
/// state (Linux `arch_prctl`), once: [`super::Kernel::supported`] caches the answer.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
pub(super) fn detect() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE.
    let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf7.edx & (1 << 22) == 0 || leaf7.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // Safety: a plain syscall with integer arguments; it fails cleanly on kernels without AMX.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
pub(super) fn detect() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
pub(super) use instructions::{block, configure, release};

#[cfg(target_arch = "x86_64")]
mod instructions {
    use std::arch::asm;

    use super::super::{Init, BLOCK_ELEMS};
    use half::bf16;

    /// `ldtilecfg` operand: palette 1, eight 16-row tiles of 64 bytes.
    #[repr(C, align(64))]
    struct Config {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    pub(in super::super) unsafe fn configure() {
        let mut cfg =
            Config { palette: 1, start_row: 0, reserved: [0; 14], colsb: [0; 16], rows: [0; 16] };
        cfg.colsb[..8].fill(64);
        cfg.rows[..8].fill(16);
        asm!("ldtilecfg [{0}]", in(reg) &cfg, options(nostack, readonly));
    }

    pub(in super::super) unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// C block (32x32 f32 at `c`, row stride `ldc` floats) = init + the product of `steps`
    /// k blocks of A (`a`) and B (`b`). Meanwhile 256 bytes per step from `prefetch` on are
    /// fetched towards L2 (the next A chunk). B tiles are loaded with the streaming hint (`t1`):
    /// each is used once per pass, while the A chunk is reused by every block of the panel.
    #[inline(always)]
    pub(in super::super) unsafe fn block(
        a: *const bf16,
        b: *const bf16,
        steps: usize,
        init: Init,
        c: *mut f32,
        ldc: usize,
        prefetch: *const bf16,
    ) {
        match init {
            Init::Zero => asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            ),
            Init::Load([p0, p1, p2, p3], stride) => asm!(
                "tileloadd tmm0, [{p0} + {s}*1]",
                "tileloadd tmm1, [{p1} + {s}*1]",
                "tileloadd tmm2, [{p2} + {s}*1]",
                "tileloadd tmm3, [{p3} + {s}*1]",
                p0 = in(reg) p0, p1 = in(reg) p1, p2 = in(reg) p2, p3 = in(reg) p3, s = in(reg) stride,
                options(nostack, readonly)
            ),
        }
        for step in 0..steps {
            let (a, b, p) =
                (a.add(step * BLOCK_ELEMS), b.add(step * BLOCK_ELEMS), prefetch.add(step * 128));
            asm!(
                "tileloadd tmm4, [{a} + {s}*1]",
                "tileloaddt1 tmm6, [{b} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "prefetcht1 [{p}]",
                "tileloadd tmm5, [{a} + {s}*1 + 1024]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "prefetcht1 [{p} + 64]",
                "tileloaddt1 tmm7, [{b} + {s}*1 + 1024]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "prefetcht1 [{p} + 128]",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "prefetcht1 [{p} + 192]",
                a = in(reg) a, b = in(reg) b, p = in(reg) p, s = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        let stride = ldc * 4;
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c, c1 = in(reg) c.add(16), c2 = in(reg) c.add(16 * ldc), c3 = in(reg) c.add(16 * ldc + 16),
            s = in(reg) stride,
            options(nostack)
        );
    }
}
