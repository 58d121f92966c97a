//! A byte-level BPE tokenizer built from a GGUF file's own metadata.
//!
//! candle's `TokenizerFromGguf` does not know the `smollm` pre-tokenizer of
//! SmolLM2's GGUF and gives different ids than llama.cpp, so the tokenizer is
//! put together here with the `tokenizers` crate: BPE from
//! `tokenizer.ggml.tokens` and `.merges`, pre-tokenizer Sequence[Digits
//! (individual), ByteLevel (no prefix space)], ByteLevel decoder, and control
//! tokens (type 3: `<|im_start|>`, `<|im_end|>`, ...) as special tokens so
//! that the chat template's markers map to their single ids.

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

/// `tokenizer.ggml.pre` values that llama.cpp splits exactly as built here
/// (its `LLAMA_VOCAB_PRE_TYPE_SMOLLM` group in `llama-vocab.cpp`: each
/// digit alone, then the GPT-2 pattern).
pub const SMOLLM_SPLIT: &[&str] = &[
    "smollm",
    "starcoder",
    "refact",
    "command-r",
    "codeshell",
    "exaone",
    "minerva-7b",
];

/// llama.cpp's token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

#[derive(Debug, thiserror::Error)]
#[error("tokenizer: {0}")]
pub struct TokenizerError(String);

pub struct GgufTokenizer {
    /// Matches special-token markers (for the chat template).
    inner: Tokenizer,
    /// Encodes markers as plain text: scraped text that contains
    /// `<|im_end|>` must not be able to end its turn in the prompt.
    data: Tokenizer,
}

fn string_array<'a>(ct: &'a Content, key: &str) -> Result<Vec<&'a str>, TokenizerError> {
    let value = ct
        .metadata
        .get(key)
        .ok_or_else(|| TokenizerError(format!("GGUF metadata lacks {key}")))?;
    let items = value
        .to_vec()
        .map_err(|e| TokenizerError(format!("{key}: {e}")))?;
    items
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(TokenizerError(format!(
                "{key} holds {:?}, not strings",
                other.value_type()
            ))),
        })
        .collect()
}

fn token_types(ct: &Content, n: usize) -> Vec<i32> {
    let types = ct
        .metadata
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|items| {
            items
                .iter()
                .map(|v| v.to_i32().unwrap_or(1))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    if types.len() == n {
        types
    } else {
        vec![1; n]
    }
}

impl GgufTokenizer {
    pub fn from_gguf(ct: &Content) -> Result<Self, TokenizerError> {
        let model = ct
            .metadata
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("gpt2");
        if model != "gpt2" {
            return Err(TokenizerError(format!(
                "only byte-level BPE (tokenizer.ggml.model = gpt2) is supported, this file has \
                 {model:?}; serve it with an OpenAI-compatible server and set OPENAI_BASE_URL"
            )));
        }
        let pre = ct
            .metadata
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str);
        // Another split rule gives other ids than the model was trained on:
        // the scores would be quietly worse, with nothing to say so. Refuse
        // instead of guessing.
        if !pre.is_some_and(|p| SMOLLM_SPLIT.contains(&p)) {
            let found = pre.map_or("none".to_owned(), |p| format!("{p:?}"));
            return Err(TokenizerError(format!(
                "pre-tokenizer (tokenizer.ggml.pre) {found} is not supported: the local provider \
                 splits text the way llama.cpp does for {}; serve this model with an \
                 OpenAI-compatible server (llama-server, Ollama, vLLM) and set OPENAI_BASE_URL \
                 instead",
                SMOLLM_SPLIT.join(", ")
            )));
        }
        let tokens = string_array(ct, "tokenizer.ggml.tokens")?;
        let merges = string_array(ct, "tokenizer.ggml.merges")?;
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| TokenizerError(format!("merge without a space: {m:?}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| TokenizerError(format!("BPE: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let types = token_types(ct, tokens.len());
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_CONTROL)
            .map(|(s, _)| AddedToken::from(s.to_string(), true))
            .collect();
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == TOKEN_TYPE_USER_DEFINED)
            .map(|(s, _)| AddedToken::from(s.to_string(), false))
            .collect();
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);
        let mut data = inner.clone();
        data.set_encode_special_tokens(true);
        Ok(Self { inner, data })
    }

    /// Ids of `text`; special-token markers in it become their single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError(format!("encode: {e}")))
    }

    /// Ids of untrusted text: markers in it stay ordinary text.
    pub fn encode_data(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        self.data
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| TokenizerError(format!("encode: {e}")))
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError(format!("decode: {e}")))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
