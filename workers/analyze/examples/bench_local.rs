//! Measures the local provider on this machine: model load time, seconds per
//! 4-option question, jobs per second and resident memory, on the fixture
//! quizzes. Run with
//! `cargo run --release -p stevedore-analyze --example bench_local -- [q8_0|f32|stored] [rounds]`.

use std::path::PathBuf;
use std::time::Instant;

use stevedore_analyze::local::{LocalProvider, WeightFormat};
use stevedore_analyze::Question;
use tokio_util::sync::CancellationToken;

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn quizzes(root: &std::path::Path) -> Result<Vec<Vec<Question>>, Box<dyn std::error::Error>> {
    let text = std::fs::read_to_string(root.join("fixtures/quiz/expected.json"))?;
    let doc: serde_json::Value = serde_json::from_str(&text)?;
    let mut out = Vec::new();
    for (_, v) in doc.as_object().into_iter().flatten() {
        if let Some(qs) = v.get("questions") {
            out.push(serde_json::from_value(qs.clone())?);
        }
    }
    Ok(out)
}

/// CPU seconds used by this process so far (all threads).
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 12th and 13th of those, in clock ticks (100 per second on Linux).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (tick(11) + tick(12)) / 100.0
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let format = match args.next().as_deref() {
        Some("f32") => WeightFormat::F32,
        Some("stored") => WeightFormat::AsStored,
        _ => WeightFormat::Q8_0,
    };
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    // Empty counts as unset, as in the binary's settings.
    let path = std::env::var("STEVEDORE_LOCAL_MODEL")
        .ok()
        .filter(|p| !p.is_empty())
        .map_or_else(
            || root.join(stevedore_analyze::DEFAULT_LOCAL_MODEL),
            PathBuf::from,
        );
    let provider = LocalProvider::new(path, format);
    let started = Instant::now();
    provider.model().await?;
    println!(
        "format {format:?}: load {:.2}s, RSS after load {:.0} MB",
        started.elapsed().as_secs_f64(),
        rss_mb()
    );
    let quizzes = quizzes(&root)?;
    let cancel = CancellationToken::new();
    let mut per_question = Vec::new();
    let (mut right, mut total, mut jobs) = (0, 0, 0);
    let bench = Instant::now();
    let cpu0 = cpu_secs();
    let mut options = 0usize;
    for round in 0..rounds {
        for quiz in &quizzes {
            for (i, q) in quiz.iter().enumerate() {
                options += q.options.len();
                let t = Instant::now();
                let out = provider.answer(vec![(i, q.clone())], &cancel).await?;
                per_question.push(t.elapsed().as_secs_f64() * 4.0 / q.options.len() as f64);
                if round == 0 {
                    total += 1;
                    right += usize::from(q.correct == Some(out.answers[0].choice as u32));
                }
            }
            jobs += 1;
        }
    }
    let secs = bench.elapsed().as_secs_f64();
    let cpu = cpu_secs() - cpu0;
    per_question.sort_by(f64::total_cmp);
    let p50 = per_question[per_question.len() / 2];
    let mean = per_question.iter().sum::<f64>() / per_question.len() as f64;
    println!(
        "per 4-option question: p50 {p50:.3}s mean {mean:.3}s wall, {:.3}s CPU; {jobs} quiz jobs in {secs:.1}s = {:.2} jobs/s; RSS {:.0} MB; accuracy {right}/{total}",
        cpu * 4.0 / options as f64,
        jobs as f64 / secs,
        rss_mb()
    );
    Ok(())
}
