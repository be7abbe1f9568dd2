//! `--perf`: the provider sampled with `perf record` during the workload phases, and the
//! profile's top written to target/bench/profile.txt.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;

use crate::process::{root, run_command};

/// `perf record` attached to the provider.
pub struct Profiler {
    perf: PathBuf,
    record: Child,
    data: PathBuf,
}

impl Profiler {
    pub fn start(pid: u32) -> anyhow::Result<Self> {
        let perf = crate::tools::apt("perf", "linux-perf")?;
        let dir = root().join("target/bench");
        std::fs::create_dir_all(&dir)?;
        let data = dir.join("perf.data");
        let record = Command::new(&perf)
            .args([
                "record",
                "-F",
                "999",
                "-e",
                "cpu-clock",
                "-p",
                &pid.to_string(),
                "-o",
            ])
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start perf record")?;
        Ok(Self { perf, record, data })
    }

    /// Stops recording (SIGINT, so perf writes its file) and writes the profile's top:
    /// samples by binary, then by function.
    pub fn finish(mut self) -> anyhow::Result<()> {
        run_command(Command::new("kill").args(["-INT", &self.record.id().to_string()]))?;
        self.record.wait()?;
        let mut text = String::new();
        for (sort, limit) in [("dso", "1"), ("dso,sym", "0.4")] {
            let out = Command::new(&self.perf)
                .args(["report", "--stdio", "--no-children", "--sort", sort])
                .args(["--percent-limit", limit, "-i"])
                .arg(&self.data)
                .stderr(Stdio::null())
                .output()
                .context("cannot run perf report")?;
            text.push_str(&String::from_utf8_lossy(&out.stdout));
        }
        let path = root().join("target/bench/profile.txt");
        std::fs::write(&path, text)?;
        eprintln!("provider profile: {}", path.display());
        Ok(())
    }
}
