//! Stage 2's losses on logits, under autodiff.
//!
//! The mean squared error, without the logits: student and teacher share the LM head `H`
//! (`[vocab, hidden]`), so the difference of their logits at a position is `H·d` for the
//! difference `d` of their final hidden states (after the final norm; a bias would cancel), and
//! its squared norm is `dᵀ·G·d` with `G = HᵀH` (`[hidden, hidden]`), computed once per run. A
//! position's error over the whole vocabulary then costs `hidden²` multiply-adds instead of the
//! head's product (`hidden·vocab`) for student and teacher, its gradient `2·G·d` likewise instead
//! of the product back through the head, and the teacher's targets are `hidden` numbers per
//! position instead of `vocab` (SmolLM2: 576 against 49,152). Same loss in exact arithmetic;
//! here in f64, where the logits' f32 products rounded each logit.
//!
//! KL of the next-token distributions needs the logits: on the CPU one pass over them each way,
//! in parallel over rows, instead of Burn's chain of single-threaded passes (log-softmax of
//! both, exp, difference, product, sum and their backward steps), each into a fresh tensor.

use std::any::Any;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{unary, Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData, TensorPrimitive};
use delta_kernels::convert::WeightElem;
use rayon::prelude::*;

use super::{logsumexp, primitive, with_values, AutodiffCpu};
use crate::llama::WeightT;
use crate::CpuBackend;

/// Rows of `H` per f64 GEMM while summing `G` (a block is `ROWS × hidden` f64: 18 MB at 576).
const ROWS: usize = 4096;

/// `G = HᵀH` of an LM head `H` (`[vocab, hidden]`) in f64, row-major `[hidden, hidden]`, with
/// the vocabulary size: what turns a difference of final hidden states into the squared error
/// of the logits it makes ([`logit_squared_error`]).
#[derive(Clone, Debug)]
pub struct HeadGram {
    values: Vec<f64>,
    hidden: usize,
    vocab: usize,
}

impl HeadGram {
    /// From the head as a model holds it (`Llama::lm_head_t`, `[hidden, vocab]`), on any backend:
    /// bf16 values on the host and a CPU tensor read in place (a tied head's embedding rows, as
    /// stored), other tensors read once.
    pub fn of<B: Backend>(head_t: &WeightT<B>) -> Self {
        let [hidden, vocab] = head_t.dims();
        match head_t {
            WeightT::Bf16Transposed(h) => Self::summed(vocab, hidden, |rows| h.values[rows.start * hidden..rows.end * hidden].iter().map(|v| v.to_f32() as f64).collect()),
            _ => with_values(&head_t.to_tensor().transpose(), |h| Self::from_rows(h, vocab, hidden)),
        }
    }

    /// From `H`'s rows (row-major `[vocab, hidden]`).
    fn from_rows(h: &[f32], vocab: usize, hidden: usize) -> Self {
        assert_eq!(h.len(), vocab * hidden, "a head of {vocab} rows of {hidden}");
        Self::summed(vocab, hidden, |rows| h[rows.start * hidden..rows.end * hidden].iter().map(|&v| v as f64).collect())
    }

    /// The sum over blocks of [`ROWS`] rows of `blockᵀ·block`, each one f64 GEMM; `rows(r)` gives
    /// rows `r` of `H` (row-major) in f64.
    fn summed(vocab: usize, hidden: usize, rows: impl Fn(std::ops::Range<usize>) -> Vec<f64>) -> Self {
        let mut values = vec![0f64; hidden * hidden];
        for start in (0..vocab).step_by(ROWS) {
            let n = ROWS.min(vocab - start);
            let block = rows(start..start + n);
            // SAFETY: `block` is n×hidden row-major, read as its hidden×n transpose through the
            // strides and as itself; `values` is hidden×hidden row-major.
            unsafe {
                matrixmultiply::dgemm(hidden, n, hidden, 1.0, block.as_ptr(), 1, hidden as isize, block.as_ptr(), hidden as isize, 1, 1.0, values.as_mut_ptr(), hidden as isize, 1);
            }
        }
        HeadGram { values, hidden, vocab }
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    /// `G` in f32 on `device`, for Burn's path.
    fn to_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        let values: Vec<f32> = self.values.iter().map(|&v| v as f32).collect();
        Tensor::from_data(TensorData::new(values, [self.hidden, self.hidden]), device)
    }

    /// `d·G` for `rows` row-major rows `d` of width `hidden`, in f64.
    fn times(&self, d: &[f64], rows: usize) -> Vec<f64> {
        let h = self.hidden;
        let mut e = vec![0f64; rows * h];
        // SAFETY: `d` is rows×h, `values` h×h and `e` rows×h, all row-major and contiguous.
        unsafe {
            matrixmultiply::dgemm(rows, h, h, 1.0, d.as_ptr(), h as isize, 1, self.values.as_ptr(), h as isize, 1, 0.0, e.as_mut_ptr(), h as isize, 1);
        }
        e
    }
}

/// The mean squared error of the logits `s·Hᵀ` against `t·Hᵀ` over all `rows × vocab` of them,
/// `Σ dᵀ·G·d / (rows·vocab)` with `d = s − t` per row: `s` the student's final hidden states
/// (`[rows, hidden]`, tracked), `t` the teacher's (constant), `gram` their shared head's.
/// On the CPU backend one custom op in f64 (`d·G` one GEMM, kept for the backward step,
/// `∂/∂s = 2·d·G / (rows·vocab)`); on any other backend Burn's operations on `G` in f32.
pub fn logit_squared_error<B: Backend>(s: &Tensor<Autodiff<B>, 2>, t: &Tensor<B, 2>, gram: &HeadGram) -> Tensor<Autodiff<B>, 1> {
    let [rows, hidden] = s.dims();
    assert!(t.dims() == [rows, hidden] && hidden == gram.hidden, "hidden states {:?} and {:?} for a head of width {}", s.dims(), t.dims(), gram.hidden);
    on_host(s, t, gram).unwrap_or_else(|| through_burn(s, t, gram))
}

/// [`logit_squared_error`] as Burn's operations, on any backend.
fn through_burn<B: Backend>(s: &Tensor<Autodiff<B>, 2>, t: &Tensor<B, 2>, gram: &HeadGram) -> Tensor<Autodiff<B>, 1> {
    let d = s.clone() - Tensor::from_inner(t.clone());
    let logits = (s.dims()[0] * gram.vocab) as f64;
    (d.clone().matmul(Tensor::from_inner(gram.to_tensor::<B>(&t.device()))) * d).sum().div_scalar(logits)
}

/// [`logit_squared_error`] on the CPU backend under autodiff; `None` for any other backend.
fn on_host<B: Backend>(s: &Tensor<Autodiff<B>, 2>, t: &Tensor<B, 2>, gram: &HeadGram) -> Option<Tensor<Autodiff<B>, 1>> {
    let s = (s as &dyn Any).downcast_ref::<Tensor<AutodiffCpu, 2>>()?;
    let t = (t as &dyn Any).downcast_ref::<Tensor<CpuBackend, 2>>()?;
    let [rows, hidden] = s.dims();
    let d: Vec<f64> = with_values(s, |s| with_values(t, |t| s.iter().zip(t).map(|(&s, &t)| s as f64 - t as f64).collect()));
    let e = gram.times(&d, rows);
    let n = (rows * gram.vocab) as f64;
    let value = d.iter().zip(&e).map(|(d, e)| d * e).sum::<f64>() / n;
    crate::same_backend(scalar_loss(LogitError, s, value, (e, [rows, hidden], n)))
}

/// A loss `value` of the tracked `s` as the output of the custom op `op`, which keeps `state` for
/// its backward step when `s` is tracked.
fn scalar_loss<Op: Backward<CpuBackend, 1>>(op: Op, s: &Tensor<AutodiffCpu, 2>, value: f64, state: Op::State) -> Tensor<AutodiffCpu, 1> {
    let value = Tensor::<CpuBackend, 1>::from_data(TensorData::new(vec![value as f32], [1]), &Default::default()).into_primitive().tensor();
    let s = s.clone().into_primitive().tensor();
    let value = match op.prepare::<NoCheckpointing>([s.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, value),
        OpsKind::UnTracked(prep) => prep.finish(value),
    };
    Tensor::from_primitive(TensorPrimitive::Float(value))
}

/// The backward step of [`logit_squared_error`] on the host; its state is `d·G`, its shape and
/// the number of logits.
#[derive(Debug)]
struct LogitError;

impl Backward<CpuBackend, 1> for LogitError {
    type State = (Vec<f64>, [usize; 2], f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (e, dims, n) = ops.state;
        unary::<CpuBackend, _>(ops.parents, ops.node, grads, |g| {
            let g = Tensor::<CpuBackend, 1>::from_primitive(TensorPrimitive::Float(g)).into_scalar() as f64;
            let k = 2.0 * g / n;
            primitive(e.iter().map(|&e| (k * e) as f32).collect(), dims)
        });
    }
}

/// KL(softmax(t) ‖ softmax(s)) of the next-token distributions, mean over rows: `s` the
/// student's logits (`[rows, vocab]`, tracked), `t` the teacher's (constant). On the CPU backend
/// under autodiff one custom op, in parallel over rows, each row's sum in f64 (the rows' sums in
/// order, so the value does not depend on the threads), its backward step
/// `∂/∂s = (softmax(s) − softmax(t)) / rows` kept from the forward pass; on any other backend
/// Burn's operations.
pub fn kl_divergence<B: Backend>(s: &Tensor<Autodiff<B>, 2>, t: &Tensor<B, 2>) -> Tensor<Autodiff<B>, 1> {
    assert_eq!(s.dims(), t.dims(), "student and teacher logits");
    kl_on_host(s, t).unwrap_or_else(|| kl_through_burn(s, t))
}

/// [`kl_divergence`] as Burn's operations, on any backend.
fn kl_through_burn<B: Backend>(s: &Tensor<Autodiff<B>, 2>, t: &Tensor<B, 2>) -> Tensor<Autodiff<B>, 1> {
    let lt = log_softmax(Tensor::<Autodiff<B>, 2>::from_inner(t.clone()), 1);
    let ls = log_softmax(s.clone(), 1);
    (lt.clone().exp() * (lt - ls)).sum().div_scalar(s.dims()[0] as f64)
}

/// [`kl_divergence`] on the CPU backend under autodiff; `None` for any other backend.
fn kl_on_host<B: Backend>(s: &Tensor<Autodiff<B>, 2>, t: &Tensor<B, 2>) -> Option<Tensor<Autodiff<B>, 1>> {
    let s = (s as &dyn Any).downcast_ref::<Tensor<AutodiffCpu, 2>>()?;
    let t = (t as &dyn Any).downcast_ref::<Tensor<CpuBackend, 2>>()?;
    let [rows, vocab] = s.dims();
    if rows * vocab == 0 {
        return None;
    }
    // Each row becomes softmax(s) − softmax(t), the backward step's state.
    let mut diff = with_values(s, |s| s.to_vec());
    let sums: Vec<f64> = with_values(t, |t| {
        diff.par_chunks_mut(vocab)
            .zip(t.par_chunks(vocab))
            .with_min_len(8)
            .map(|(s, t)| {
                let (lse_s, lse_t) = (logsumexp(s).1, logsumexp(t).1);
                let mut kl = 0f64;
                for (s, &t) in s.iter_mut().zip(t) {
                    let (ls, lt) = (*s as f64 - lse_s, t as f64 - lse_t);
                    let pt = lt.exp();
                    kl += pt * (lt - ls);
                    *s = (ls.exp() - pt) as f32;
                }
                kl
            })
            .collect()
    });
    let value = sums.iter().sum::<f64>() / rows as f64;
    crate::same_backend(scalar_loss(Divergence, s, value, (diff, [rows, vocab])))
}

/// The backward step of [`kl_divergence`] on the host; its state is `softmax(s) − softmax(t)`
/// and its shape.
#[derive(Debug)]
struct Divergence;

impl Backward<CpuBackend, 1> for Divergence {
    type State = (Vec<f32>, [usize; 2]);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (mut diff, [rows, vocab]) = ops.state;
        unary::<CpuBackend, _>(ops.parents, ops.node, grads, |g| {
            let g = Tensor::<CpuBackend, 1>::from_primitive(TensorPrimitive::Float(g)).into_scalar();
            let k = g / rows as f32;
            diff.par_chunks_mut(vocab).with_min_len(8).for_each(|row| row.iter_mut().for_each(|v| *v *= k));
            primitive(diff, [rows, vocab])
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::tests::values;

    type AD = Autodiff<CpuBackend>;

    /// `loss` of `student` is `want` and a third of it has the gradient `want_grad`, within
    /// `tolerance` (relative; the gradient's relative to its largest element).
    fn by_hand(path: &str, student: &Tensor<AD, 2>, loss: Tensor<AD, 1>, want: f64, want_grad: &[f64], tolerance: f64) {
        let got = loss.clone().into_scalar() as f64;
        assert!((got - want).abs() <= tolerance * want, "{path}: {got} against {want}");
        let grads = loss.div_scalar(3.0).backward();
        let got = student.grad(&grads).expect("s is tracked").into_data().into_vec::<f32>().unwrap();
        let largest = want_grad.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (k, (g, w)) in got.iter().zip(want_grad).enumerate() {
            assert!((*g as f64 - w).abs() <= tolerance * largest, "{path}: gradient {k}, {g} against {w}");
        }
    }

    /// The loss and `s`'s gradient, on the host and through Burn, are those of the logits
    /// written out, by hand in f64: the mean of `(s·Hᵀ − t·Hᵀ)²` over every logit, and
    /// `2·(s·Hᵀ − t·Hᵀ)·H / n` (here of a third of the loss). `H` has more rows than one block of
    /// the Gram's sum, and the Gram is read from a transposed head as `Llama` holds it.
    #[test]
    fn the_loss_and_its_gradient_are_the_logits_mse_by_hand() {
        let (rows, hidden, vocab) = (7, 24, ROWS + 301);
        let h = values(vocab * hidden, 21);
        let (s, t) = (values(rows * hidden, 22), values(rows * hidden, 23));
        let logits = |x: &[f32]| -> Vec<f64> {
            x.chunks(hidden).flat_map(|x| h.chunks(hidden).map(move |hv| hv.iter().zip(x).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>())).collect()
        };
        let diff: Vec<f64> = logits(&s).iter().zip(logits(&t)).map(|(a, b)| a - b).collect();
        let n = (rows * vocab) as f64;
        let want = diff.iter().map(|v| v * v).sum::<f64>() / n;
        let want_grad: Vec<f64> = (0..rows * hidden).map(|k| (0..vocab).map(|v| diff[k / hidden * vocab + v] * h[v * hidden + k % hidden] as f64).sum::<f64>() * 2.0 / n / 3.0).collect();

        let head_t = WeightT::<CpuBackend>::Tensor(Tensor::from_data(TensorData::new(h.clone(), [vocab, hidden]), &Default::default()).transpose());
        let gram = HeadGram::of(&head_t);
        assert_eq!((gram.hidden(), gram.vocab()), (hidden, vocab));
        let teacher = Tensor::<CpuBackend, 2>::from_data(TensorData::new(t, [rows, hidden]), &Default::default());
        type Loss = fn(&Tensor<AD, 2>, &Tensor<CpuBackend, 2>, &HeadGram) -> Tensor<AD, 1>;
        for (path, f, tolerance) in [("host", logit_squared_error as Loss, 1e-6), ("Burn", through_burn as Loss, 1e-4)] {
            let student = Tensor::<AD, 2>::from_data(TensorData::new(s.clone(), [rows, hidden]), &Default::default()).require_grad();
            by_hand(path, &student, f(&student, &teacher, &gram), want, &want_grad, tolerance);
        }
    }

    /// KL on the host and through Burn: the value and `s`'s gradient (of a third of the loss)
    /// by hand in f64, `mean_rows Σ p_t·(log p_t − log p_s)` and `(p_s − p_t) / (3·rows)`.
    #[test]
    fn kl_and_its_gradient_are_the_divergence_by_hand() {
        let (rows, vocab) = (37, 1001);
        let (s, t) = (values(rows * vocab, 31), values(rows * vocab, 32));
        let log_softmax = |row: &[f32]| -> Vec<f64> {
            let lse = row.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
            row.iter().map(|&v| v as f64 - lse).collect()
        };
        let (ls, lt): (Vec<f64>, Vec<f64>) = (s.chunks(vocab).flat_map(log_softmax).collect(), t.chunks(vocab).flat_map(log_softmax).collect());
        let want = lt.iter().zip(&ls).map(|(t, s)| t.exp() * (t - s)).sum::<f64>() / rows as f64;
        let want_grad: Vec<f64> = ls.iter().zip(&lt).map(|(s, t)| (s.exp() - t.exp()) / (3.0 * rows as f64)).collect();
        let teacher = Tensor::<CpuBackend, 2>::from_data(TensorData::new(t, [rows, vocab]), &Default::default());
        type Loss = fn(&Tensor<AD, 2>, &Tensor<CpuBackend, 2>) -> Tensor<AD, 1>;
        for (path, f, tolerance) in [("host", kl_divergence as Loss, 1e-6), ("Burn", kl_through_burn as Loss, 1e-4)] {
            let student = Tensor::<AD, 2>::from_data(TensorData::new(s.clone(), [rows, vocab]), &Default::default()).require_grad();
            by_hand(path, &student, f(&student, &teacher), want, &want_grad, tolerance);
        }
    }
}
