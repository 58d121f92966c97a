//! A llama forward pass that returns the logits of chosen positions, with
//! explicit positions and an explicit attention mask.
//!
//! candle's `quantized_llama::ModelWeights` (whose loading and layer code
//! this follows) returns only the last position's logits, so scoring an
//! option of n tokens takes n separate single-token passes per option. Here
//! the prompt and every option go through in one pass per question: each
//! option's tokens sit at the positions right after the prompt and the mask
//! lets them see the prompt and their own option only (a token tree), so the
//! result is the same as feeding each option after the prompt on its own.

use candle_core::quantized::{gguf_file, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_transformers::quantized_nn::RmsNorm;

/// Rotary tables cover this many positions (as in candle's llama).
pub const MAX_SEQ_LEN: usize = 4096;

struct Layer {
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
    gate: QMatMul,
    down: QMatMul,
    up: QMatMul,
}

/// Keys and values of the tokens seen so far, per layer, each
/// `(1, kv_heads, len, head_dim)`. Cloning shares the tensors.
#[derive(Clone, Default)]
pub struct KvCache {
    kv: Vec<(Tensor, Tensor)>,
    pub len: usize,
}

pub struct Llama {
    embeddings: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    n_head: usize,
    n_kv_head: usize,
    head_dim: usize,
}

impl Llama {
    /// Reads a llama-architecture GGUF (dense feed-forward only), passing
    /// every tensor through `convert` as it is read.
    pub fn from_gguf<R: std::io::Seek + std::io::Read>(
        ct: &gguf_file::Content,
        reader: &mut R,
        device: &Device,
        convert: impl Fn(QTensor) -> Result<QTensor>,
    ) -> Result<Self> {
        let md = |k: &str| match ct.metadata.get(k) {
            Some(v) => Ok(v),
            None => candle_core::bail!("GGUF metadata lacks {k}"),
        };
        if md("llama.expert_count")
            .and_then(|v| v.to_u32())
            .unwrap_or(0)
            > 1
        {
            candle_core::bail!("mixture-of-experts models are not supported");
        }
        let n_head = md("llama.attention.head_count")?.to_u32()? as usize;
        let n_kv_head = md("llama.attention.head_count_kv")?.to_u32()? as usize;
        let blocks = md("llama.block_count")?.to_u32()? as usize;
        let dim = md("llama.embedding_length")?.to_u32()? as usize;
        let rope_dim = md("llama.rope.dimension_count")?.to_u32()? as usize;
        let eps = f64::from(md("llama.attention.layer_norm_rms_epsilon")?.to_f32()?);
        let base = md("llama.rope.freq_base")
            .and_then(|v| v.to_f32())
            .unwrap_or(10_000.0);
        let (cos, sin) = rope_tables(rope_dim, base, device)?;
        let tensor = |name: &str, r: &mut R| convert(ct.tensor(r, name, device)?);
        let embeddings_q = tensor("token_embd.weight", reader)?;
        let embeddings = embeddings_q.dequantize(device)?;
        let norm = RmsNorm::from_qtensor(tensor("output_norm.weight", reader)?, eps)?;
        // Tied embeddings (SmolLM2 has no output matrix) project with a
        // quantized copy: a dense matmul against the transposed f32
        // embeddings measured slower once two threads share the work.
        let output = if ct.tensor_infos.contains_key("output.weight") {
            tensor("output.weight", reader)?
        } else {
            embeddings_q
        };
        let mut layers = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let mut q =
                |n: &str| -> Result<QTensor> { tensor(&format!("blk.{i}.{n}.weight"), reader) };
            let mm = QMatMul::from_qtensor;
            layers.push(Layer {
                wq: mm(q("attn_q")?)?,
                wk: mm(q("attn_k")?)?,
                wv: mm(q("attn_v")?)?,
                wo: mm(q("attn_output")?)?,
                attn_norm: RmsNorm::from_qtensor(q("attn_norm")?, eps)?,
                ffn_norm: RmsNorm::from_qtensor(q("ffn_norm")?, eps)?,
                gate: mm(q("ffn_gate")?)?,
                down: mm(q("ffn_down")?)?,
                up: mm(q("ffn_up")?)?,
            });
        }
        Ok(Self {
            embeddings,
            layers,
            norm,
            output: QMatMul::from_qtensor(output)?,
            cos,
            sin,
            n_head,
            n_kv_head,
            head_dim: dim / n_head,
        })
    }

    /// Runs `tokens` at `positions` after everything in `cache`. `visible`
    /// says which of the new tokens each new token attends to (every token
    /// always sees the whole cache). Returns the log-probabilities of the next
    /// token at each index in `rows`, `(rows.len(), vocab)`, and the cache
    /// extended with the new tokens.
    pub fn forward(
        &self,
        cache: &KvCache,
        tokens: &[u32],
        positions: &[u32],
        visible: impl Fn(usize, usize) -> bool,
        rows: &[u32],
    ) -> Result<(Tensor, KvCache)> {
        let device = self.embeddings.device();
        let t = tokens.len();
        let total = cache.len + t;
        let mut mask = vec![0f32; t * total];
        for i in 0..t {
            for j in 0..t {
                if !visible(i, j) {
                    mask[i * total + cache.len + j] = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (t, total), device)?;
        let pos = Tensor::new(positions, device)?;
        let (cos, sin) = (
            self.cos.index_select(&pos, 0)?,
            self.sin.index_select(&pos, 0)?,
        );
        let ids = Tensor::new(tokens, device)?;
        let mut x = self.embeddings.index_select(&ids, 0)?.unsqueeze(0)?;
        let mut kv = Vec::with_capacity(self.layers.len());
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let (attn, k, v) = self.attention(layer, &h, cache.kv.get(l), &cos, &sin, &mask)?;
            kv.push((k, v));
            let x1 = (attn + &x)?;
            let h = layer.ffn_norm.forward(&x1)?;
            let ff = layer.down.forward(
                &(candle_nn::ops::silu(&layer.gate.forward(&h)?)? * layer.up.forward(&h)?)?,
            )?;
            x = (ff + x1)?;
        }
        let x = self.norm.forward(&x)?;
        let picked = x.index_select(&Tensor::new(rows, device)?, 1)?;
        let logits = self
            .output
            .forward(&picked)?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        Ok((logprobs, KvCache { kv, len: total }))
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        past: Option<&(Tensor, Tensor)>,
        cos: &Tensor,
        sin: &Tensor,
        mask: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t, dim) = x.dims3()?;
        let split = |w: &QMatMul, heads: usize| -> Result<Tensor> {
            w.forward(x)?
                .reshape((b, t, heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = candle_nn::rotary_emb::rope_i(&split(&layer.wq, self.n_head)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope_i(&split(&layer.wk, self.n_kv_head)?, cos, sin)?;
        let v = split(&layer.wv, self.n_kv_head)?;
        let (k, v) = match past {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        let rep = self.n_head / self.n_kv_head;
        let kr = candle_transformers::utils::repeat_kv(k.clone(), rep)?;
        let vr = candle_transformers::utils::repeat_kv(v.clone(), rep)?;
        let att = (q.matmul(&kr.t()?)? / (self.head_dim as f64).sqrt())?;
        let att = candle_nn::ops::softmax_last_dim(&att.broadcast_add(mask)?)?;
        let y = att
            .matmul(&vr.contiguous()?)?
            .transpose(1, 2)?
            .reshape((b, t, dim))?;
        Ok((layer.wo.forward(&y)?, k, v))
    }
}

/// llama's interleaved rotary embedding tables, `(MAX_SEQ_LEN, dim / 2)`.
fn rope_tables(dim: usize, base: f32, device: &Device) -> Result<(Tensor, Tensor)> {
    let theta: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
        .collect();
    let theta = Tensor::new(theta.as_slice(), device)?;
    let idx = Tensor::arange(0, MAX_SEQ_LEN as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((MAX_SEQ_LEN, 1))?
        .matmul(&theta.reshape((1, theta.elem_count()))?)?;
    Ok((idx.cos()?, idx.sin()?))
}
