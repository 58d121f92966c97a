//! `stevedore bench-analyze`: how often the analyze provider in use picks
//! the right option on a labelled question set (`fixtures/analyze/`), and
//! how long it takes per question.
//!
//! Every question goes through the analyze kind's own handler (the same
//! prompt, scoring and answer checks a job gets) as a one-question job,
//! without the queue and without the answer cache, so every answer is the
//! model's own. The provider is chosen as the fleet chooses it:
//! `OPENAI_BASE_URL` or `OPENAI_API_KEY` make it the OpenAI-compatible
//! endpoint with `STEVEDORE_ANALYZE_MODEL`, otherwise it is the local model
//! at `STEVEDORE_LOCAL_MODEL`. The correct answer never reaches the
//! provider. A question is tried up to three times when the error is one
//! the queue would retry; one that still fails ends the run with its error
//! (a score over the questions that happened to work would flatter).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use serde::{Deserialize, Serialize};
use stevedore_analyze::{
    AnalyzeConfig, AnalyzeHandler, AnalyzePayload, MemoryAnswerCache, MemoryRateLimiter,
    OpenAiConfig, ProviderKind, Question, RateLimits,
};
use stevedore_handler::{Handler, JobContext, Payload as _};

use crate::config::KindsArgs;

/// Where the set lives, relative to the repo root (like the model's path).
pub const DEFAULT_SET: &str = "fixtures/analyze/labelled.json";

/// Attempts per question, as the queue would give a job whose model reply
/// was invalid or whose endpoint failed for a moment (`invalid_reply_attempts`).
const ATTEMPTS: u32 = 3;

#[derive(Debug, Args)]
pub struct BenchAnalyzeArgs {
    /// The labelled question set (format: fixtures/analyze/README.md).
    #[arg(long = "set", default_value = DEFAULT_SET)]
    pub set: PathBuf,
    /// Ask only the first N questions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub kinds: KindsArgs,
}

/// One labelled question.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Labelled {
    pub id: String,
    pub language: String,
    pub subject: String,
    pub text: String,
    pub options: Vec<String>,
    /// Index of the correct option.
    pub answer: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelledSet {
    #[serde(default)]
    #[allow(dead_code)]
    about: Option<String>,
    questions: Vec<Labelled>,
}

/// Reads and checks a set: every question a valid analyze question, every
/// answer an existing option, ids unique.
pub fn load_set(path: &std::path::Path) -> anyhow::Result<Vec<Labelled>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the question set {}", path.display()))?;
    let set: LabelledSet =
        serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(&text))
            .with_context(|| format!("{} is not a labelled question set", path.display()))?;
    let mut ids = HashSet::new();
    for q in &set.questions {
        if !ids.insert(q.id.as_str()) {
            bail!("{}: duplicate id {:?}", path.display(), q.id);
        }
        if q.answer >= q.options.len() {
            bail!(
                "{}: {}: answer {} but only {} options",
                path.display(),
                q.id,
                q.answer,
                q.options.len()
            );
        }
        payload(q)
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {}: {e}", path.display(), q.id))?;
    }
    if set.questions.is_empty() {
        bail!("{}: no questions", path.display());
    }
    Ok(set.questions)
}

/// The job a question becomes: its text and options, never its answer.
fn payload(q: &Labelled) -> AnalyzePayload {
    AnalyzePayload {
        questions: vec![Question {
            text: q.text.clone(),
            options: q.options.clone(),
            correct: None,
        }],
        model: None,
        provider: None,
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub correct: usize,
    pub total: usize,
}

impl Tally {
    fn add(&mut self, right: bool) {
        self.total += 1;
        self.correct += usize::from(right);
    }

    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.correct as f64 * 100.0 / self.total as f64
        }
    }
}

/// What the provider answered to one question.
#[derive(Debug, Clone, Serialize)]
pub struct Asked {
    pub id: String,
    pub choice: usize,
    pub answer: usize,
    pub confidence: f64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub set: String,
    pub provider: String,
    pub model: String,
    #[serde(flatten)]
    pub overall: Tally,
    pub accuracy: f64,
    /// Expected accuracy of picking an option at random.
    pub chance: f64,
    pub seconds_per_question: f64,
    /// Loading the local model before the first question (not in the
    /// per-question time).
    pub load_seconds: f64,
    pub by_language: BTreeMap<String, Tally>,
    pub by_subject: BTreeMap<String, Tally>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notice: Option<String>,
    pub answers: Vec<Asked>,
}

/// Tallies answers against the set, overall, per language and per subject.
pub fn score(
    set: &[Labelled],
    answers: &[Asked],
) -> (Tally, BTreeMap<String, Tally>, BTreeMap<String, Tally>) {
    let mut all = Tally::default();
    let mut lang: BTreeMap<String, Tally> = BTreeMap::new();
    let mut subj: BTreeMap<String, Tally> = BTreeMap::new();
    for (q, a) in set.iter().zip(answers) {
        let right = a.choice == q.answer;
        all.add(right);
        lang.entry(q.language.clone()).or_default().add(right);
        subj.entry(q.subject.clone()).or_default().add(right);
    }
    (all, lang, subj)
}

/// The handler the fleet would build from the same settings, with no cache
/// (a cached answer would time nothing) and in-process limits.
fn handler(k: &KindsArgs) -> anyhow::Result<AnalyzeHandler> {
    // As src/fleet builds it: either setting selects the endpoint.
    let openai =
        (k.openai_api_key.is_some() || k.openai_base_url.is_some()).then(|| OpenAiConfig {
            base_url: k
                .openai_base_url
                .clone()
                .unwrap_or_else(|| "https://api.openai.com/v1".into()),
            api_key: k.openai_api_key.clone(),
            model: k.analyze_model.clone(),
            timeout: Duration::from_secs(120),
        });
    let mut cfg = AnalyzeConfig::in_process(openai, &k.local_model);
    cfg.cache = Arc::new(MemoryAnswerCache::new(Duration::ZERO, 1));
    cfg.rate_limiter = Arc::new(MemoryRateLimiter::new(RateLimits::per_minute(
        k.analyze_rpm,
        k.analyze_tpm,
    )));
    cfg.invalid_reply_attempts = ATTEMPTS;
    Ok(AnalyzeHandler::new(cfg, &prometheus::Registry::new())?)
}

/// Asks one question, retrying what the queue would retry.
async fn ask(h: &AnalyzeHandler, q: &Labelled) -> anyhow::Result<stevedore_analyze::AnalyzeOutput> {
    let mut attempt = 1;
    loop {
        let ctx = JobContext::new(uuid::Uuid::now_v7(), attempt, Default::default());
        match h.run(&ctx, payload(q)).await {
            Ok(out) => return Ok(out),
            Err(e) if e.is_retryable() && attempt < ATTEMPTS => {
                tracing::info!(question = %q.id, attempt, error = %e, "Retrying a question.");
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => bail!("question {}: {e}", q.id),
        }
    }
}

pub async fn run(args: BenchAnalyzeArgs) -> anyhow::Result<()> {
    let mut set = load_set(&args.set)?;
    if let Some(n) = args.limit {
        set.truncate(n.max(1));
    }
    let h = handler(&args.kinds)?;
    let provider = h.default_provider();
    let mut load_seconds = 0.0;
    if provider == ProviderKind::Local {
        // Loaded once per process in the fleet too: not a per-question cost.
        let started = Instant::now();
        h.local().model().await?;
        load_seconds = started.elapsed().as_secs_f64();
    }
    if !args.json {
        eprintln!(
            "bench-analyze: {} questions from {}, provider {}",
            set.len(),
            args.set.display(),
            provider.as_str()
        );
    }
    let mut answers = Vec::with_capacity(set.len());
    let (mut model, mut notice) = (String::new(), None);
    let started = Instant::now();
    for q in &set {
        let out = ask(&h, q).await?;
        let a = out
            .answers
            .first()
            .context("the handler returned no answer")?;
        answers.push(Asked {
            id: q.id.clone(),
            choice: a.choice,
            answer: q.answer,
            confidence: a.confidence,
        });
        model = out.model;
        notice = out.notice;
    }
    let seconds = started.elapsed().as_secs_f64();
    let (overall, by_language, by_subject) = score(&set, &answers);
    let report = Report {
        set: args.set.display().to_string(),
        provider: provider.as_str().to_owned(),
        model,
        overall,
        accuracy: overall.percent() / 100.0,
        chance: set
            .iter()
            .map(|q| 1.0 / q.options.len() as f64)
            .sum::<f64>()
            / set.len() as f64,
        seconds_per_question: seconds / set.len() as f64,
        load_seconds,
        by_language,
        by_subject,
        notice,
        answers,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn breakdown(tallies: &BTreeMap<String, Tally>) -> String {
    tallies
        .iter()
        .map(|(k, t)| format!("{k} {}/{} ({:.0}%)", t.correct, t.total, t.percent()))
        .collect::<Vec<_>>()
        .join("  ")
}

fn print_report(r: &Report) {
    println!("provider {}  model {}", r.provider, r.model);
    println!(
        "accuracy {}/{} = {:.1}%  (chance {:.1}%)  {:.3} s/question",
        r.overall.correct,
        r.overall.total,
        r.overall.percent(),
        r.chance * 100.0,
        r.seconds_per_question
    );
    println!("  by language: {}", breakdown(&r.by_language));
    println!("  by subject:  {}", breakdown(&r.by_subject));
    if r.load_seconds > 0.0 {
        println!("  model load {:.2} s (not counted above)", r.load_seconds);
    }
    if let Some(n) = &r.notice {
        println!("note: {n}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(id: &str, language: &str, subject: &str, answer: usize) -> Labelled {
        Labelled {
            id: id.into(),
            language: language.into(),
            subject: subject.into(),
            text: format!("question {id}"),
            options: vec!["a".into(), "b".into(), "c".into()],
            answer,
        }
    }

    fn asked(q: &Labelled, choice: usize) -> Asked {
        Asked {
            id: q.id.clone(),
            choice,
            answer: q.answer,
            confidence: 0.5,
        }
    }

    #[test]
    fn score_counts_right_answers_overall_per_language_and_subject() {
        let set = [
            q("1", "en", "math", 0),
            q("2", "en", "history", 2),
            q("3", "de", "math", 1),
            q("4", "fr", "math", 1),
        ];
        let answers = [
            asked(&set[0], 0),
            asked(&set[1], 1),
            asked(&set[2], 1),
            asked(&set[3], 0),
        ];
        let (all, lang, subj) = score(&set, &answers);
        assert_eq!(
            all,
            Tally {
                correct: 2,
                total: 4
            }
        );
        assert_eq!(
            lang["en"],
            Tally {
                correct: 1,
                total: 2
            }
        );
        assert_eq!(
            lang["de"],
            Tally {
                correct: 1,
                total: 1
            }
        );
        assert_eq!(
            lang["fr"],
            Tally {
                correct: 0,
                total: 1
            }
        );
        assert_eq!(
            subj["math"],
            Tally {
                correct: 2,
                total: 3
            }
        );
        assert_eq!(
            subj["history"],
            Tally {
                correct: 0,
                total: 1
            }
        );
        assert_eq!(all.percent(), 50.0);
    }

    #[test]
    fn the_bundled_set_is_valid_and_wide_enough() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_SET);
        let set = load_set(&path).expect("the bundled set loads");
        assert!(set.len() >= 50, "{} questions", set.len());
        let languages: HashSet<_> = set.iter().map(|q| q.language.as_str()).collect();
        let subjects: HashSet<_> = set.iter().map(|q| q.subject.as_str()).collect();
        assert!(languages.len() >= 3, "{languages:?}");
        assert!(subjects.len() >= 4, "{subjects:?}");
        // Always picking one position must not look like knowledge.
        for pos in 0..4 {
            let n = set.iter().filter(|q| q.answer == pos).count();
            assert!(n * 2 < set.len(), "{n} answers at position {pos}");
        }
    }

    #[test]
    fn a_set_with_an_answer_out_of_range_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("set.json");
        let bad = serde_json::json!({"questions": [
            {"id": "x", "language": "en", "subject": "math", "text": "1+1?", "options": ["2", "3"], "answer": 2}
        ]});
        std::fs::write(&path, bad.to_string()).expect("write");
        let err = load_set(&path).expect_err("refused");
        assert!(
            err.to_string().contains("answer 2 but only 2 options"),
            "{err}"
        );
    }
}
