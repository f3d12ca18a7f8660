//! Benchmark of `pack` against the system `tar czf` on a realistic, generated payload.
//!
//! The tree mimics DAPHNE's `bin/` and `lib/`: ELF-like files mixing repetitive code,
//! symbol tables from a small vocabulary and ~12% incompressible blocks, so compression
//! ratios and speeds resemble real binaries. Generation is seeded and deterministic.

use std::fmt;
use std::fs;
use std::io::{BufWriter, Write};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use camino::Utf8Path;

use super::{pack, Compression, Entry, PackSpec};

/// Bump when the generator changes, so old trees are regenerated.
const GENERATOR_VERSION: u32 = 1;
/// Timed runs per tool; the median is reported.
const RUNS: usize = 3;
const MIB: u64 = 1 << 20;

/// Side-by-side timings and sizes; `Display` prints a small table.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub input_bytes: u64,
    pub files: usize,
    pub compression: Compression,
    pub runs: usize,
    /// Median wall times in seconds.
    pub pack_secs: f64,
    pub tar_secs: f64,
    /// tar_secs / pack_secs; the packaging issue asks for >= 3.
    pub speedup: f64,
    pub pack_bytes: u64,
    pub tar_bytes: u64,
    /// The size target: pack's archive is not larger than `tar czf`'s.
    pub pack_not_larger: bool,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / MIB as f64;
        let label = match self.compression {
            Compression::Zstd { level } => format!("pack (zstd -{level})"),
            Compression::Gzip { level } => format!("pack (gzip -{level})"),
        };
        writeln!(
            f,
            "payload: {:.1} MiB in {} files, median of {} runs",
            mib(self.input_bytes),
            self.files,
            self.runs
        )?;
        writeln!(
            f,
            "{:<18} {:>9} {:>12} {:>7}",
            "tool", "time", "size", "ratio"
        )?;
        for (name, secs, bytes) in [
            (label.as_str(), self.pack_secs, self.pack_bytes),
            ("tar czf", self.tar_secs, self.tar_bytes),
        ] {
            let ratio = self.input_bytes as f64 / bytes.max(1) as f64;
            writeln!(
                f,
                "{name:<18} {secs:>8.2}s {:>8.1} MiB {ratio:>6.2}x",
                mib(bytes)
            )?;
        }
        let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
        writeln!(
            f,
            "speedup vs tar czf: {:.2}x (target >= 3x: {})",
            self.speedup,
            verdict(self.speedup >= 3.0)
        )?;
        write!(
            f,
            "size vs gzip: {} (target: not larger)",
            verdict(self.pack_not_larger)
        )
    }
}

/// Generates (or reuses) a ~`size_mb` MiB tree under `work_dir` and times `pack` (default
/// compression) against `tar czf`.
pub fn bench_package(work_dir: &Utf8Path, size_mb: u64) -> Result<BenchReport> {
    bench_package_with(work_dir, size_mb, Compression::default())
}

/// [`bench_package`] with an explicit compression, to compare levels.
pub fn bench_package_with(
    work_dir: &Utf8Path,
    size_mb: u64,
    compression: Compression,
) -> Result<BenchReport> {
    let tree = work_dir.join("tree");
    ensure_tree(work_dir, &tree, size_mb)?;
    let entries = collect_entries(&tree)?;
    let input_bytes = entries
        .iter()
        .filter_map(|e| fs::symlink_metadata(&e.source).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum();
    let out_dir = work_dir.join("out");
    let spec = bench_spec(entries, &out_dir, compression);
    let tar_out = work_dir.join("tar-czf.tar.gz");

    let (mut pack_times, mut tar_times) = (Vec::new(), Vec::new());
    let (mut pack_bytes, mut tar_bytes) = (0, 0);
    for _ in 0..RUNS {
        // Alternate the two tools so cache and frequency effects hit both alike.
        remove_dir_if_exists(&out_dir)?;
        let start = Instant::now();
        let packed = pack(&spec, &mut |_, _| {})?;
        pack_times.push(start.elapsed().as_secs_f64());
        if packed.skipped {
            bail!("pack skipped its work although the output was deleted");
        }
        pack_bytes = packed.bytes;

        let start = Instant::now();
        run_tar_czf(&tree, &tar_out)?;
        tar_times.push(start.elapsed().as_secs_f64());
        tar_bytes = fs::metadata(&tar_out)
            .with_context(|| format!("tar did not create {tar_out}"))?
            .len();
    }
    let (pack_secs, tar_secs) = (median(&mut pack_times), median(&mut tar_times));
    Ok(BenchReport {
        input_bytes,
        files: spec.entries.len(),
        compression: spec.compression,
        runs: RUNS,
        pack_secs,
        tar_secs,
        speedup: tar_secs / pack_secs.max(1e-9),
        pack_bytes,
        tar_bytes,
        pack_not_larger: pack_bytes <= tar_bytes,
    })
}

fn bench_spec(entries: Vec<Entry>, out_dir: &Utf8Path, compression: Compression) -> PackSpec {
    PackSpec {
        entries,
        compression,
        mtime: 1_700_000_000,
        tool_version: "bench".into(),
        source_commit: "0000000000000000000000000000000000000000".into(),
        source_dirty: false,
        image: None,
        target: "bench".into(),
        out_dir: out_dir.to_owned(),
    }
}

fn run_tar_czf(tree: &Utf8Path, out: &Utf8Path) -> Result<()> {
    let status = Command::new("tar")
        .args(["czf", out.as_str(), "-C", tree.as_str(), "."])
        .status()
        .context("cannot run `tar`; install GNU tar to run the benchmark")?;
    if !status.success() {
        bail!("`tar czf {out} -C {tree} .` failed with {status}");
    }
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn remove_dir_if_exists(dir: &Utf8Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {dir}"))
        }
        _ => Ok(()),
    }
}

/// Every file and symlink under `root` as pack entries (archive path = relative path).
fn collect_entries(root: &Utf8Path) -> Result<Vec<Entry>> {
    let mut entries = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for item in dir
            .read_dir_utf8()
            .with_context(|| format!("cannot list {dir}"))?
        {
            let item = item.with_context(|| format!("cannot list {dir}"))?;
            let path = item.path().to_owned();
            if item.file_type()?.is_dir() {
                stack.push(path);
            } else {
                let rel = path
                    .strip_prefix(root)
                    .context("walked outside the tree")?
                    .to_string();
                entries.push(Entry::new(rel, path));
            }
        }
    }
    entries.sort_by(|a, b| a.archive_path.cmp(&b.archive_path));
    Ok(entries)
}

/// Regenerates the tree unless a stamp with the same parameters says it is current.
fn ensure_tree(work_dir: &Utf8Path, tree: &Utf8Path, size_mb: u64) -> Result<()> {
    let stamp = work_dir.join("tree.stamp");
    let wanted = format!("generator={GENERATOR_VERSION} size_mb={size_mb}\n");
    if tree.is_dir() && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(());
    }
    let _ = fs::remove_file(&stamp);
    remove_dir_if_exists(tree)?;
    generate_tree(tree, size_mb)?;
    fs::write(&stamp, wanted).with_context(|| format!("cannot write {stamp}"))
}

/// One generated file.
struct Planned {
    path: &'static str,
    kind: Kind,
    /// Share of the total size in per mille (binaries); ignored for fixed-size files.
    share: u64,
}

#[derive(Clone, Copy)]
enum Kind {
    Elf { executable: bool },
    Csv,
    Script,
    Text,
}

/// Roughly the shape of a DAPHNE build: one big executable, LLVM/MLIR and BLAS libraries.
const LAYOUT: &[Planned] = &[
    Planned {
        path: "bin/daphne",
        kind: Kind::Elf { executable: true },
        share: 180,
    },
    Planned {
        path: "bin/DaphneDSLParser",
        kind: Kind::Elf { executable: true },
        share: 20,
    },
    Planned {
        path: "bin/git_source_status_info",
        kind: Kind::Text,
        share: 0,
    },
    Planned {
        path: "lib/libLLVM.so.18",
        kind: Kind::Elf { executable: false },
        share: 260,
    },
    Planned {
        path: "lib/libMLIR.so.18",
        kind: Kind::Elf { executable: false },
        share: 200,
    },
    Planned {
        path: "lib/libopenblas.so.0",
        kind: Kind::Elf { executable: false },
        share: 90,
    },
    Planned {
        path: "lib/libAllKernels.so",
        kind: Kind::Elf { executable: false },
        share: 120,
    },
    Planned {
        path: "lib/libarrow.so.1500",
        kind: Kind::Elf { executable: false },
        share: 50,
    },
    Planned {
        path: "lib/libstdc++.so.6",
        kind: Kind::Elf { executable: false },
        share: 10,
    },
    Planned {
        path: "lib/libspdlog.so.1",
        kind: Kind::Elf { executable: false },
        share: 5,
    },
    Planned {
        path: "lib/libhwloc.so.15",
        kind: Kind::Elf { executable: false },
        share: 5,
    },
    Planned {
        path: "lib/libz.so.1",
        kind: Kind::Elf { executable: false },
        share: 2,
    },
    Planned {
        path: "data/matrix_a.csv",
        kind: Kind::Csv,
        share: 25,
    },
    Planned {
        path: "data/labels.csv",
        kind: Kind::Csv,
        share: 8,
    },
    Planned {
        path: "scripts/linreg.daph",
        kind: Kind::Script,
        share: 0,
    },
    Planned {
        path: "scripts/kmeans.daph",
        kind: Kind::Script,
        share: 0,
    },
    Planned {
        path: "scripts/components.daph",
        kind: Kind::Script,
        share: 0,
    },
];

fn generate_tree(tree: &Utf8Path, size_mb: u64) -> Result<()> {
    let total = size_mb.max(1) * MIB;
    let shares: u64 = LAYOUT.iter().map(|p| p.share).sum();
    let mut rng = XorShift::new(0x5eed_da9e_2024);
    for planned in LAYOUT {
        let path = tree.join(planned.path);
        let size = total * planned.share / shares;
        write_generated(&path, planned.kind, size, &mut rng)?;
    }
    // Shared libraries come with their unversioned symlinks, as in a real lib/.
    std::os::unix::fs::symlink("libopenblas.so.0", tree.join("lib/libopenblas.so"))
        .with_context(|| format!("cannot create a symlink in {tree}"))?;
    Ok(())
}

fn write_generated(path: &Utf8Path, kind: Kind, size: u64, rng: &mut XorShift) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {dir}"))?;
    }
    let file = fs::File::create(path).with_context(|| format!("cannot create {path}"))?;
    let mut out = BufWriter::with_capacity(MIB as usize, file);
    let data = match kind {
        Kind::Elf { .. } => elf_like(size, rng),
        Kind::Csv => csv_like(size, rng),
        Kind::Script => script_like(rng),
        Kind::Text => {
            b"commit 0123456789abcdef0123456789abcdef01234567\nbranch main\nclean\n".to_vec()
        }
    };
    out.write_all(&data)
        .and_then(|()| out.flush())
        .with_context(|| format!("cannot write {path}"))?;
    if let Kind::Elf { executable: true } = kind {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("cannot chmod {path}"))?;
    }
    Ok(())
}

/// Seeded xorshift64*: deterministic, fast, no dependency.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        XorShift(seed | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Skewed towards small values, like opcode and symbol frequencies.
    fn skewed(&mut self, n: u64) -> u64 {
        self.below(n).min(self.below(n))
    }
}

const WORDS: &[&str] = &[
    "daphne",
    "matrix",
    "dense",
    "csr",
    "kernel",
    "ewBinary",
    "aggRow",
    "aggCol",
    "transpose",
    "matMul",
    "mlir",
    "llvm",
    "Operation",
    "Value",
    "Builder",
    "Region",
    "Block",
    "Type",
    "Attribute",
    "Pass",
    "vector",
    "string",
    "allocator",
    "basic_string",
    "unique_ptr",
    "shared_ptr",
    "DataObject",
    "Frame",
    "Structure",
    "context",
    "execute",
    "lower",
    "rewrite",
    "pattern",
    "apply",
    "create",
    "get",
    "set",
];

/// ELF-like content in the proportions of libLLVM's sections: code (~45%), read-only data
/// (~20%), symbols (~12%), relocations (~10%), plus ~13% incompressible blocks.
fn elf_like(size: u64, rng: &mut XorShift) -> Vec<u8> {
    let size = size as usize;
    let mut out = Vec::with_capacity(size + 64);
    out.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    let idioms = Idioms::new(rng);
    while out.len() < size {
        let len = (16 << 10) + rng.below(240 << 10) as usize;
        let end = (out.len() + len).min(size);
        match rng.below(100) {
            0..=44 => code(&mut out, end, &idioms, rng),
            45..=64 => rodata(&mut out, end, rng),
            65..=76 => symbols(&mut out, end, rng),
            77..=86 => relocations(&mut out, end, rng),
            _ => random(&mut out, end, rng),
        }
    }
    out.truncate(size);
    out
}

/// Recurring machine-code patterns: short "instructions" and longer "idioms" built from
/// them (prologues, loops, inlined helpers), which is what makes real code compressible.
struct Idioms {
    opcodes: Vec<Vec<u8>>,
    snippets: Vec<Vec<u8>>,
}

impl Idioms {
    const OPCODES: u64 = 160;
    const SNIPPETS: u64 = 300;

    fn new(rng: &mut XorShift) -> Self {
        let opcodes: Vec<Vec<u8>> = (0..Self::OPCODES)
            .map(|_| (0..1 + rng.below(6)).map(|_| rng.next() as u8).collect())
            .collect();
        let snippets = (0..Self::SNIPPETS)
            .map(|_| {
                let mut s = Vec::new();
                for _ in 0..2 + rng.below(10) {
                    s.extend_from_slice(&opcodes[rng.skewed(Self::OPCODES) as usize]);
                }
                s
            })
            .collect();
        Idioms { opcodes, snippets }
    }
}

fn code(out: &mut Vec<u8>, end: usize, idioms: &Idioms, rng: &mut XorShift) {
    while out.len() < end {
        let r = rng.next();
        match r % 8 {
            // Recurring idioms mixed with one-off instructions.
            0..=1 => out.extend_from_slice(&idioms.snippets[rng.skewed(Idioms::SNIPPETS) as usize]),
            2..=4 => out.extend_from_slice(&idioms.opcodes[rng.skewed(Idioms::OPCODES) as usize]),
            5 | 6 => {
                // call rel32: the displacement is what differs between call sites.
                out.push(0xe8);
                out.extend_from_slice(&(((r >> 8) % 0x100_0000) as i32 - 0x80_0000).to_le_bytes());
            }
            _ => {
                // RIP-relative load: opcode, ModRM, 32-bit displacement.
                out.extend_from_slice(&[0x48, 0x8b, 0x05 | ((r >> 8) as u8 & 0x38)]);
                out.extend_from_slice(&(((r >> 16) % 0x40_0000) as u32).to_le_bytes());
            }
        }
    }
}

/// Read-only data: message strings, small-integer constant tables and alignment padding.
fn rodata(out: &mut Vec<u8>, end: usize, rng: &mut XorShift) {
    while out.len() < end {
        match rng.below(3) {
            0 => {
                for _ in 0..3 + rng.below(8) {
                    out.extend_from_slice(
                        WORDS[rng.skewed(WORDS.len() as u64) as usize].as_bytes(),
                    );
                    out.push(b' ');
                }
                out.extend_from_slice(b"failed: %s\n\0");
            }
            1 => {
                // 8-byte aligned pointer table into nearby code.
                out.resize(out.len().next_multiple_of(8), 0);
                let mut value = 0x40_0000 + rng.below(1 << 22);
                for _ in 0..16 + rng.below(64) {
                    value += rng.skewed(256);
                    out.extend_from_slice(&value.to_le_bytes());
                }
            }
            _ => out.resize(out.len() + rng.below(64) as usize, 0),
        }
    }
}

/// Mangled C++ names (.dynstr) followed by Elf64_Sym-like records (.dynsym).
fn symbols(out: &mut Vec<u8>, end: usize, rng: &mut XorShift) {
    let strtab_end = out.len() + (end - out.len()) * 2 / 3;
    while out.len() < strtab_end {
        out.extend_from_slice(b"_ZN");
        for _ in 0..2 + rng.below(3) {
            let word = WORDS[rng.skewed(WORDS.len() as u64) as usize];
            out.extend_from_slice(word.len().to_string().as_bytes());
            out.extend_from_slice(word.as_bytes());
        }
        out.extend_from_slice(
            [&b"Ev\0"[..], b"ERKS_\0", b"EPKc\0", b"Ei\0"][rng.below(4) as usize],
        );
    }
    let mut name = 0u32;
    let mut value = 0x40_0000u64;
    while out.len() < end {
        name += 8 + rng.below(40) as u32;
        value += 16 + rng.below(512);
        out.extend_from_slice(&name.to_le_bytes());
        out.extend_from_slice(&[0x12, 0, 14, 0]);
        out.extend_from_slice(&value.to_le_bytes());
        out.extend_from_slice(&rng.below(2048).to_le_bytes());
    }
}

/// Elf64_Rela-like records: mostly R_X86_64_RELATIVE with increasing offsets and addends.
fn relocations(out: &mut Vec<u8>, end: usize, rng: &mut XorShift) {
    let mut offset = 0x60_0000u64 + (rng.below(1 << 16) << 3);
    let mut addend = 0x20_0000u64 + rng.below(1 << 20);
    while out.len() < end {
        let relative = rng.below(10) != 0;
        offset += if relative { 8 } else { 8 * (1 + rng.below(16)) };
        addend += rng.skewed(256);
        let info = if relative {
            8
        } else {
            6 + (rng.skewed(5000) << 32)
        };
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&info.to_le_bytes());
        out.extend_from_slice(&addend.to_le_bytes());
    }
}

/// Incompressible data (compressed debug sections, embedded tables).
fn random(out: &mut Vec<u8>, end: usize, rng: &mut XorShift) {
    while out.len() < end {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
}

fn csv_like(size: u64, rng: &mut XorShift) -> Vec<u8> {
    let size = size as usize;
    let mut out = Vec::with_capacity(size + 128);
    while out.len() < size {
        for col in 0..8 {
            let v = rng.below(2_000_000) as f64 / 1000.0 - 1000.0;
            out.extend_from_slice(format!("{}{v:.3}", if col == 0 { "" } else { "," }).as_bytes());
        }
        out.push(b'\n');
    }
    out.truncate(size);
    out
}

fn script_like(rng: &mut XorShift) -> Vec<u8> {
    let mut out = String::from("// generated DaphneDSL script\n");
    for i in 0..20 + rng.below(60) {
        let word = WORDS[rng.below(WORDS.len() as u64) as usize];
        out.push_str(&format!(
            "X{i} = rand({}, {}, 0.0, 1.0, 1, {i});\nprint(sum(X{i})); // {word}\n",
            10 + i,
            20 + i
        ));
    }
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use camino::Utf8PathBuf;

    fn tree_dir(work_dir: &Utf8Path) -> Utf8PathBuf {
        work_dir.join("tree")
    }

    fn utf8_tempdir() -> (tempfile::TempDir, Utf8PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let path = Utf8PathBuf::from_path_buf(tmp.path().to_owned()).unwrap();
        (tmp, path)
    }

    #[test]
    fn bench_runs_on_a_tiny_tree() {
        let (_tmp, dir) = utf8_tempdir();
        let report = bench_package(&dir, 2).unwrap();
        assert!(
            report.input_bytes > MIB && report.input_bytes <= 3 * MIB,
            "{report:?}"
        );
        assert!(report.pack_bytes > 0 && report.tar_bytes > 0);
        assert!(report.pack_secs > 0.0 && report.tar_secs > 0.0);
        assert!(report.to_string().contains("tar czf"));
    }

    /// The real measurement: `cargo test -p xtask package::bench -- --ignored --nocapture`
    /// (size via PACKAGE_BENCH_MB, default 300; zstd levels to compare via PACKAGE_BENCH_LEVELS=1,3,5;
    /// the tree is kept in the system temp dir).
    #[test]
    #[ignore = "takes about a minute"]
    fn bench_full_size() {
        let size = std::env::var("PACKAGE_BENCH_MB")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(300);
        let dir =
            Utf8PathBuf::from_path_buf(std::env::temp_dir().join("xtask-package-bench")).unwrap();
        let levels = std::env::var("PACKAGE_BENCH_LEVELS").unwrap_or_default();
        if levels.is_empty() {
            println!("{}", bench_package(&dir, size).unwrap());
        }
        for level in levels.split(',').filter_map(|l| l.trim().parse().ok()) {
            println!(
                "{}\n",
                bench_package_with(&dir, size, Compression::Zstd { level }).unwrap()
            );
        }
    }

    #[test]
    fn tree_is_deterministic_and_reused() {
        let (_a, dir_a) = utf8_tempdir();
        let (_b, dir_b) = utf8_tempdir();
        ensure_tree(&dir_a, &tree_dir(&dir_a), 1).unwrap();
        ensure_tree(&dir_b, &tree_dir(&dir_b), 1).unwrap();
        let file = "lib/libLLVM.so.18";
        let read = |d: &Utf8Path| fs::read(tree_dir(d).join(file)).unwrap();
        assert_eq!(read(&dir_a), read(&dir_b));
        // A matching stamp means no regeneration: a marker file survives.
        fs::write(tree_dir(&dir_a).join("marker"), b"x").unwrap();
        ensure_tree(&dir_a, &tree_dir(&dir_a), 1).unwrap();
        assert!(tree_dir(&dir_a).join("marker").exists());
        ensure_tree(&dir_a, &tree_dir(&dir_a), 2).unwrap();
        assert!(!tree_dir(&dir_a).join("marker").exists());
    }
}
