using FineTune.Domain.Models;
using FineTune.Worker.Tests.Training;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Methods.Bone;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Tests.Torch;

/// <summary>F.Rotary and F.SwiGlu (one autograd node each; one CUDA kernel each way where the shim has them) against
/// the composite formulas in plain ops, differentiated by autograd: forward and the gradients of a random upstream
/// gradient, fp32 (tight) and bf16 (bf16 rounding). Run on <see cref="TestData.Device"/>: FINETUNE_TEST_DEVICE=cuda on
/// a GPU host checks the kernels (FINETUNE_EXPECT_FUSED_KERNELS=1 makes a build without them fail).</summary>
public sealed class FusedOpsTests(ITestOutputHelper output)
{
    private static Device Dev => TestData.Device;

    /// <summary>max |a − b| in fp32, over max(1, max |b|).</summary>
    private static double RelDiff(Tensor a, Tensor b)
    {
        using var scope = DisposeScope.Begin();
        Assert.Equal(b.Shape, a.Shape);
        var b32 = b.To(ScalarType.Float32);
        return (a.To(ScalarType.Float32) - b32).Abs().Max().ItemDouble() / Math.Max(1, b32.Abs().Max().ItemDouble());
    }

    private static double Tolerance(ScalarType dtype) => dtype == ScalarType.BFloat16 ? 2e-2 : 2e-6;

    [Fact]
    public void Reports_which_path_runs()
    {
        output.WriteLine($"device {Dev}, fused CUDA kernels compiled in: {Cuda.FusedKernelsAvailable}, CUDA libtorch: {Cuda.IsCudaBuild}");
        if (Environment.GetEnvironmentVariable("FINETUNE_EXPECT_FUSED_KERNELS") == "1")
            Assert.True(Cuda.FusedKernelsAvailable, "FINETUNE_EXPECT_FUSED_KERNELS=1 but the shim was built without fused_kernels.cu");
    }

    // d = 16: the kernel's 16-byte vector form (halves of 8 bf16 or 2×4 fp32); d = 12: its scalar form.
    public static TheoryData<ScalarType, string, int> RotaryCases => new()
    {
        { ScalarType.Float32, "tables", 16 }, { ScalarType.Float32, "random", 16 }, { ScalarType.Float32, "per-row", 16 },
        { ScalarType.BFloat16, "tables", 16 }, { ScalarType.BFloat16, "random", 16 }, { ScalarType.BFloat16, "per-row", 16 },
        { ScalarType.Float32, "per-row", 12 }, { ScalarType.BFloat16, "random", 12 },
    };

    /// <summary>x (B, T, H, D) = (2, 7, 3, d) as the transposed view of a contiguous (B, H, T, D) tensor (so the op sees
    /// a non-contiguous input, as in backward); cos/sin: the model's tables (T, D), random (T, D) tables whose halves differ (the kernel
    /// must read both), or per-row (B, T, D) tables gathered at packed positions. Reference: Rotary.Apply on the
    /// (B, H, T, D) view.</summary>
    [Theory, MemberData(nameof(RotaryCases))]
    public void Rotary_forward_and_gradient_equal_the_composite_formula(ScalarType dtype, string tables, int d)
    {
        const int b = 2, t = 7, h = 3;
        using var gen = new Generator(5);
        using var scope = DisposeScope.Begin();
        Tensor cos, sin;
        if (tables == "random")
        {
            cos = Tensor.Randn([t, d], gen).To(Dev, dtype);
            sin = Tensor.Randn([t, d], gen).To(Dev, dtype);
        }
        else
        {
            var config = new ModelConfig { HiddenSize = h * d, NumAttentionHeads = h, RopeTheta = 100 };
            (cos, sin) = new Rotary(config).Tables(t, Dev, dtype);
            if (tables == "per-row")
            {
                using var positions = Tensor.From(new long[] { 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6 }, b, t).To(Dev);
                (cos, sin) = (F.Embedding(cos, positions), F.Embedding(sin, positions));
            }
        }
        var (cosRef, sinRef) = tables == "per-row" ? (cos.Unsqueeze(1), sin.Unsqueeze(1)) : (cos, sin);
        var x0 = Tensor.Randn([b, h, t, d], gen).To(Dev, dtype);
        var gy = Tensor.Randn([b, t, h, d], gen).To(Dev, dtype);

        (Tensor Y, Tensor Gx) Run(bool fused)
        {
            var x = x0.Clone().RequiresGrad_();
            var y = fused ? F.Rotary(x.Transpose(1, 2), cos, sin) : Rotary.Apply(x, cosRef, sinRef).Transpose(1, 2);
            (y * gy).Sum().Backward();
            return (y.Detach(), x.Grad!);
        }

        var fusedRun = Run(fused: true);
        var reference = Run(fused: false);
        Assert.Equal(dtype, fusedRun.Y.DType);
        Assert.Equal(dtype, fusedRun.Gx.DType);
        Assert.True(RelDiff(fusedRun.Y, reference.Y) < Tolerance(dtype), $"forward differs by {RelDiff(fusedRun.Y, reference.Y)}");
        Assert.True(RelDiff(fusedRun.Gx, reference.Gx) < Tolerance(dtype), $"grad x differs by {RelDiff(fusedRun.Gx, reference.Gx)}");
        // Rotation preserves norms pairwise when cos² + sin² = 1: a check that cannot pass with the halves swapped.
        if (tables == "tables" && dtype == ScalarType.Float32)
        {
            var xt = x0.Transpose(1, 2);
            Assert.True(RelDiff((fusedRun.Y * fusedRun.Y).Sum([-1]), (xt * xt).Sum([-1])) < 1e-5);
        }
    }

    [Theory, InlineData(ScalarType.Float32), InlineData(ScalarType.BFloat16)]
    public void SwiGlu_forward_and_gradients_equal_silu_times_up(ScalarType dtype)
    {
        using var gen = new Generator(9);
        using var scope = DisposeScope.Begin();
        // gate as a transposed (non-contiguous) view; values to ±6 reach both tails of the sigmoid.
        var gate0 = (Tensor.Randn([3, 40, 5], gen) * 2.5).To(Dev, dtype);
        var up0 = Tensor.Randn([3, 5, 40], gen).To(Dev, dtype);
        var gy = Tensor.Randn([3, 5, 40], gen).To(Dev, dtype);

        (Tensor Y, Tensor Gg, Tensor Gu) Run(bool fused)
        {
            var gate = gate0.Clone().RequiresGrad_();
            var up = up0.Clone().RequiresGrad_();
            var g = gate.Transpose(1, 2);
            var y = fused ? F.SwiGlu(g, up) : g.Silu() * up;
            (y * gy).Sum().Backward();
            return (y.Detach(), gate.Grad!, up.Grad!);
        }

        var fusedRun = Run(fused: true);
        var reference = Run(fused: false);
        Assert.Equal(dtype, fusedRun.Y.DType);
        Assert.True(RelDiff(fusedRun.Y, reference.Y) < Tolerance(dtype), $"forward differs by {RelDiff(fusedRun.Y, reference.Y)}");
        Assert.True(RelDiff(fusedRun.Gg, reference.Gg) < Tolerance(dtype), $"grad gate differs by {RelDiff(fusedRun.Gg, reference.Gg)}");
        Assert.True(RelDiff(fusedRun.Gu, reference.Gu) < Tolerance(dtype), $"grad up differs by {RelDiff(fusedRun.Gu, reference.Gu)}");
        Assert.True(reference.Gg.Abs().Sum().ItemDouble() > 0);
    }

    /// <summary>F.Dropout with a seed (CUDA: the fused kernel over a generator made for the call; CPU: a Bernoulli mask):
    /// the mask is a function of the seed alone, whatever the device's default generator does in between; kept values
    /// are scaled by 1/(1 − p), the drop rate is p, and the gradient is the mask scaled the same way.</summary>
    [Theory, InlineData(ScalarType.Float32), InlineData(ScalarType.BFloat16)]
    public void Seeded_dropout_is_a_function_of_its_seed_and_scales_the_kept_values(ScalarType dtype)
    {
        using var scope = DisposeScope.Begin();
        const double p = 0.25;
        var x = Tensor.Ones([64, 512], dtype, Dev);
        var a = F.Dropout(x, p, training: true, seed: 1234);
        // A second call draws again from the device's generator if it used one; a seeded call draws the same mask.
        var again = F.Dropout(x, p, training: true, seed: 1234);
        var other = F.Dropout(x, p, training: true, seed: 1235);
        Assert.Equal(0, (a - again).Abs().Max().ItemDouble());
        Assert.True((a - other).Abs().Max().ItemDouble() > 0, "another seed drew the same mask");
        var kept = a.Ne(0.0).To(ScalarType.Float32).Mean().ItemDouble();
        Assert.InRange(kept, 1 - p - 0.02, 1 - p + 0.02);   // 32,768 draws: the rate within ~5 standard deviations
        var scaled = a.To(ScalarType.Float32);
        var scale = Tensor.Full([], 1 / (1 - p), dtype).ItemDouble();   // 1/(1 − p) in x's dtype
        Assert.Equal(scale, scaled.Max().ItemDouble(), 1e-6);
        Assert.Equal(0, (scaled * (scaled - scale)).Abs().Max().ItemDouble());   // every value is 0 or 1/(1 − p)
        Assert.Same(x, F.Dropout(x, p, training: false, seed: 1234));
        Assert.Same(x, F.Dropout(x, 0, training: true, seed: 1234));

        var xg = Tensor.Ones([64, 512], dtype, Dev).RequiresGrad_();
        var y = F.Dropout(xg, p, training: true, seed: 1234);
        y.To(ScalarType.Float32).Sum().Backward();
        Assert.Equal(0, (xg.Grad!.To(ScalarType.Float32) - scaled).Abs().Max().ItemDouble());
    }

    /// <summary>F.LinearCrossEntropy (on CUDA one kernel per chunk: row log-sum-exp and softmax − one-hot in place) against
    /// cross_entropy of the full logits, differentiated by autograd: loss and both gradients, with ignored targets, a
    /// short last chunk, vocabularies that take the kernel's vector form (v % 8 = 0, several loads per thread) and its
    /// scalar form, peaked logits (scale 4), fp32 and bf16.</summary>
    [Theory]
    [InlineData(ScalarType.Float32, 13L), InlineData(ScalarType.Float32, 4104L), InlineData(ScalarType.Float32, 4099L)]
    [InlineData(ScalarType.BFloat16, 13L), InlineData(ScalarType.BFloat16, 4104L), InlineData(ScalarType.BFloat16, 4099L)]
    public void Linear_cross_entropy_equals_cross_entropy_of_the_logits(ScalarType dtype, long vocab)
    {
        using var gen = new Generator(11);
        using var scope = DisposeScope.Begin();
        var h0 = (Tensor.Randn([10, 8], gen) * 2).To(Dev, dtype);
        var w0 = Tensor.Randn([vocab, 8], gen).To(Dev, dtype);
        var targets = Tensor.From(new long[] { 3, -100, 0, vocab - 1, 7, 7, -100, 1, 5, 2 }).To(Dev);

        (Tensor Loss, Tensor Gh, Tensor Gw) Run(bool fused)
        {
            var h = h0.Clone().RequiresGrad_();
            var w = w0.Clone().RequiresGrad_();
            var loss = fused ? F.LinearCrossEntropy(h, w, targets, -100, chunkRows: 4)
                             : F.CrossEntropy(F.Linear(h, w).To(ScalarType.Float32), targets, -100, "sum");
            (loss * 0.25).Backward();
            return (loss.Detach(), h.Grad!, w.Grad!);
        }

        var fusedRun = Run(fused: true);
        var reference = Run(fused: false);
        Assert.True(RelDiff(fusedRun.Loss, reference.Loss) < (dtype == ScalarType.BFloat16 ? 1e-3 : 1e-6),
            $"loss {fusedRun.Loss.ItemDouble()} vs {reference.Loss.ItemDouble()}");
        Assert.Equal(dtype, fusedRun.Gh.DType);
        Assert.True(RelDiff(fusedRun.Gh, reference.Gh) < Tolerance(dtype), $"grad hidden differs by {RelDiff(fusedRun.Gh, reference.Gh)}");
        Assert.True(RelDiff(fusedRun.Gw, reference.Gw) < Tolerance(dtype), $"grad weight differs by {RelDiff(fusedRun.Gw, reference.Gw)}");
        // Rows with an ignored target get no gradient.
        Assert.Equal(0.0, fusedRun.Gh.Narrow(0, 1, 1).Abs().Sum().ItemDouble());
        Assert.Equal(0.0, fusedRun.Gh.Narrow(0, 6, 1).Abs().Sum().ItemDouble());
        using (global::FineTune.Worker.Torch.Torch.NoGrad())
            Assert.True(RelDiff(F.LinearCrossEntropy(h0, w0, targets, -100, chunkRows: 4), fusedRun.Loss) < 1e-6);
    }

    /// <summary>A target outside the vocabulary is a clear error on the CPU and a NaN loss from the CUDA kernel (which
    /// the trainer reports as a non-finite loss); never a device-side assertion, which would end the process's CUDA
    /// context.</summary>
    [Fact]
    public void Linear_cross_entropy_with_a_target_outside_the_vocabulary_fails_cleanly()
    {
        using var scope = DisposeScope.Begin();
        var h = Tensor.Ones([2, 4], device: Dev);
        var w = Tensor.Ones([5, 4], device: Dev);
        var targets = Tensor.From(new long[] { 1, 5 }).To(Dev);
        if (Dev.Kind == DeviceKind.Cpu)
            Assert.Throws<TorchException>(() => F.LinearCrossEntropy(h, w, targets));
        else if (Cuda.FusedKernelsAvailable)
            Assert.True(double.IsNaN(F.LinearCrossEntropy(h, w, targets).ItemDouble()));
        else
            output.WriteLine("skipped: CUDA without the fused kernels would stop on a device-side assertion");
    }

    /// <summary>AdapterOps.LoraLinearExact (fp32 LoRA math over a bf16 base on bf16 tensor cores, three-term splits) against
    /// the composed fp32 form (x cast to fp32, fp32 GEMMs, the sum rounded once into the bf16 base output): the fp32
    /// gradients of A and B to fp32 accumulation error, the bf16 output and input gradient to bf16 rounding. CUDA with
    /// the kernels and torch ≥ 2.8 only; elsewhere it must report itself unavailable and refuse clearly. aExact: A is a
    /// one-hot matrix (Bone's chunk sum) passed as one bf16 term.</summary>
    [Theory, InlineData(false), InlineData(true)]
    public void Exact_lora_linear_matches_the_composed_fp32_form(bool aExact)
    {
        using var gen = new Generator(21);
        using var scope = DisposeScope.Begin();
        const int tokens = 96, inF = 40, outF = 24, r = 8;
        const double s = 1.75;   // not a power of two: a scale applied in bf16 anywhere would show
        var x0 = Tensor.Randn([2, tokens / 2, inF], gen).To(Dev, ScalarType.BFloat16);
        var w = (Tensor.Randn([outF, inF], gen) * 0.2).To(Dev, ScalarType.BFloat16);
        var a0 = aExact ? BoneLayer.LoraA(r, inF).To(Dev) : (Tensor.Randn([r, inF], gen) * 0.3).To(Dev);
        var b0 = (Tensor.Randn([outF, r], gen) * 0.3).To(Dev);
        var gy = Tensor.Randn([2, tokens / 2, outF], gen).To(Dev, ScalarType.BFloat16);
        if (!AdapterOps.LoraLinearExactAvailable(Dev))
        {
            Assert.Contains("lora_linear_exact", Assert.Throws<TorchException>(() => AdapterOps.LoraLinearExact(x0, w, null, a0, b0, s, aExact)).Message);
            Assert.False(Dev.Kind == DeviceKind.Cuda && Environment.GetEnvironmentVariable("FINETUNE_EXPECT_FUSED_KERNELS") == "1",
                "FINETUNE_EXPECT_FUSED_KERNELS=1 but the exact LoRA node is not available on cuda");
            output.WriteLine($"exact LoRA node not available on {Dev}: checked that it refuses clearly");
            return;
        }

        (Tensor Y, Tensor Gx, Tensor Ga, Tensor Gb) Run(bool exact)
        {
            var x = x0.Clone().RequiresGrad_();
            var a = a0.Clone().RequiresGrad_();
            var b = b0.Clone().RequiresGrad_();
            var y = exact ? AdapterOps.LoraLinearExact(x, w, null, a, b, s, aExact)
                          : F.Linear(x, w).Add_(F.Linear(F.Linear(x.To(ScalarType.Float32), a), b) * s);
            (y.To(ScalarType.Float32) * gy.To(ScalarType.Float32)).Sum().Backward();
            return (y.Detach(), x.Grad!, a.Grad!, b.Grad!);
        }

        var e = Run(exact: true);
        var c = Run(exact: false);
        Assert.Equal(ScalarType.BFloat16, e.Y.DType);
        Assert.Equal(ScalarType.Float32, e.Ga.DType);
        var (dy, dgx, dga, dgb) = (RelDiff(e.Y, c.Y), RelDiff(e.Gx, c.Gx), RelDiff(e.Ga, c.Ga), RelDiff(e.Gb, c.Gb));
        output.WriteLine($"exact vs composed fp32: y {dy:E2}, grad x {dgx:E2}, grad A {dga:E2}, grad B {dgb:E2}");
        Assert.True(dy < 2e-2 && dgx < 2e-2, $"bf16 results differ: y {dy}, grad x {dgx}");
        Assert.True(dga < 1e-4 && dgb < 1e-4, $"fp32 gradients differ: A {dga}, B {dgb}");
        if (aExact) return;
        // bf16 operands for A and B (one term instead of three) would differ by ~4e-3: the split is what is measured.
        var bf16Ga = F.Linear(F.Linear(x0.To(ScalarType.Float32), a0.To(ScalarType.BFloat16).To(ScalarType.Float32)), b0);
        Assert.True(RelDiff(bf16Ga, F.Linear(F.Linear(x0.To(ScalarType.Float32), a0), b0)) > 1e-4, "the check cannot tell one term from three");
    }

    /// <summary>AdapterOps.DoraLinearExact (DoRA with fp32 adapter math over a bf16 base) against PEFT's fp32 formula
    /// y = base + (f − 1)·base + f·s·(x Aᵀ) Bᵀ, base = x Wᵀ in bf16 and the rest in fp32 with x cast to fp32, f = m/‖·‖:
    /// A's and B's gradients to fp32 accumulation error (1e-4), m's to the bf16 rounding of the product that each side
    /// differentiates through (one bf16 ulp, 2^-8: with random gy the relative error does not shrink with the tokens; 2.2e-3
    /// measured on the H200), the bf16 output and input gradient to bf16 rounding. f is not 1, so a
    /// misplaced scale would show.</summary>
    [Fact]
    public void Exact_dora_linear_matches_PEFTs_fp32_formula()
    {
        using var gen = new Generator(23);
        using var scope = DisposeScope.Begin();
        const int tokens = 96, inF = 40, outF = 24, r = 8;
        const double s = 1.75;
        var x0 = Tensor.Randn([2, tokens / 2, inF], gen).To(Dev, ScalarType.BFloat16);
        var w = (Tensor.Randn([outF, inF], gen) * 0.2).To(Dev, ScalarType.BFloat16);
        var a0 = (Tensor.Randn([r, inF], gen) * 0.3).To(Dev);
        var b0 = (Tensor.Randn([outF, r], gen) * 0.3).To(Dev);
        var m0 = (Tensor.Rand([outF], gen) + 0.5).To(Dev);
        var norm = (Tensor.Rand([outF], gen) + 0.5).To(Dev);   // the detached ‖W + s·B·A‖: a constant here
        var gy = Tensor.Randn([2, tokens / 2, outF], gen).To(Dev, ScalarType.BFloat16);
        if (!AdapterOps.LoraLinearExactAvailable(Dev))
        {
            Assert.Contains("dora_linear_exact", Assert.Throws<TorchException>(() => AdapterOps.DoraLinearExact(x0, w, null, a0, b0, m0 / norm, s)).Message);
            output.WriteLine($"exact DoRA node not available on {Dev}: checked that it refuses clearly");
            return;
        }

        (Tensor Y, Tensor Gx, Tensor Ga, Tensor Gb, Tensor Gm) Run(bool exact)
        {
            var x = x0.Clone().RequiresGrad_();
            var a = a0.Clone().RequiresGrad_();
            var b = b0.Clone().RequiresGrad_();
            var m = m0.Clone().RequiresGrad_();
            var f = m / norm;
            Tensor y;
            if (exact) y = AdapterOps.DoraLinearExact(x, w, null, a, b, f, s);
            else
            {
                var baseOut = F.Linear(x, w);
                var lora = F.Linear(F.Linear(x.To(ScalarType.Float32), a), b) * s;
                y = (baseOut + (f - 1) * baseOut.To(ScalarType.Float32) + f * lora).To(ScalarType.BFloat16);
            }
            (y.To(ScalarType.Float32) * gy.To(ScalarType.Float32)).Sum().Backward();
            return (y.Detach(), x.Grad!, a.Grad!, b.Grad!, m.Grad!);
        }

        var e = Run(exact: true);
        var c = Run(exact: false);
        Assert.Equal(ScalarType.BFloat16, e.Y.DType);
        Assert.Equal(ScalarType.Float32, e.Gm.DType);
        var (dy, dgx, dga, dgb, dgm) = (RelDiff(e.Y, c.Y), RelDiff(e.Gx, c.Gx), RelDiff(e.Ga, c.Ga), RelDiff(e.Gb, c.Gb), RelDiff(e.Gm, c.Gm));
        output.WriteLine($"exact DoRA vs PEFT's fp32 formula: y {dy:E2}, grad x {dgx:E2}, grad A {dga:E2}, grad B {dgb:E2}, grad m {dgm:E2}");
        Assert.True(dy < 2e-2 && dgx < 2e-2, $"bf16 results differ: y {dy}, grad x {dgx}");
        Assert.True(dga < 1e-4 && dgb < 1e-4, $"fp32 gradients differ: A {dga}, B {dgb}");
        Assert.True(dgm < 5e-3, $"grad m differs by {dgm}");
        // The check can tell: B's gradient without f (a scale left out) is off by far more than the tolerance.
        Assert.True(RelDiff(e.Gb / (m0 / norm).Unsqueeze(1), c.Gb) > 1e-2, "the check cannot see f in B's gradient");
    }

    /// <summary>Early in training m moves by the learning rate, so f = m/‖·‖ differs from 1 by less than bf16's resolution.
    /// PEFT's fp32 sum f·v + f·s·(x Aᵀ) Bᵀ, rounded once, still moves y by (f − 1)·y on average; scaling an already
    /// rounded bf16 product would move no element at all. The exact DoRA node must move y as PEFT's formula does.</summary>
    [Fact]
    public void Exact_dora_linear_keeps_a_magnitude_change_below_bf16_resolution()
    {
        using var gen = new Generator(29);
        using var scope = DisposeScope.Begin();
        const int tokens = 512, inF = 64, outF = 64, r = 8;
        var x = Tensor.Randn([tokens, inF], gen).To(Dev, ScalarType.BFloat16);
        var w = (Tensor.Randn([outF, inF], gen) * 0.2).To(Dev, ScalarType.BFloat16);
        var a = (Tensor.Randn([r, inF], gen) * 0.3).To(Dev);
        var b = (Tensor.Randn([outF, r], gen) * 0.01).To(Dev);   // a small adapter term, as early in training
        if (!AdapterOps.LoraLinearExactAvailable(Dev))
        {
            output.WriteLine($"exact DoRA node not available on {Dev}");
            return;
        }
        const double df = 3e-4;   // below bf16's relative resolution (2^-8 ≈ 3.9e-3)
        var one = Tensor.Ones([outF], device: Dev);
        var f = one * (1 + df);
        Tensor Peft(Tensor fs)
        {
            var baseOut = F.Linear(x, w);
            var lora = F.Linear(F.Linear(x.To(ScalarType.Float32), a), b);
            return (baseOut + (fs - 1) * baseOut.To(ScalarType.Float32) + fs * lora).To(ScalarType.BFloat16).To(ScalarType.Float32);
        }
        Tensor Node(Tensor fs) => AdapterOps.DoraLinearExact(x, w, null, a, b, fs, 1.0).To(ScalarType.Float32);
        // How far y moved along itself, in units of df: Σ (y_f − y₁)·y₁ / Σ y₁² / df is ~1 when the change survives the
        // rounding (each element flips to its neighbour with a probability that makes the mean move (f − 1)·y), 0 when
        // no element moves.
        double Moved(Func<Tensor, Tensor> y)
        {
            var y1 = y(one);
            return ((y(f) - y1) * y1).Sum().ItemDouble() / (y1 * y1).Sum().ItemDouble() / df;
        }
        var (peft, node) = (Moved(Peft), Moved(Node));
        output.WriteLine($"y moved by (f − 1)·y times: PEFT's formula {peft:F3}, exact node {node:F3}");
        Assert.InRange(peft, 0.5, 1.5);
        Assert.InRange(node, peft - 0.25, peft + 0.25);
    }

    [Fact]
    public void Bad_shapes_are_clear_errors()
    {
        using var scope = DisposeScope.Begin();
        var x = Tensor.Zeros([1, 4, 2, 8], device: Dev);
        var ok = Tensor.Zeros([4, 8], device: Dev);
        Assert.Contains("head dimension must be even", Assert.Throws<TorchException>(() => F.Rotary(Tensor.Zeros([1, 4, 2, 7], device: Dev), Tensor.Zeros([4, 7], device: Dev), Tensor.Zeros([4, 7], device: Dev))).Message);
        Assert.Contains("(T, D) = (4, 8)", Assert.Throws<TorchException>(() => F.Rotary(x, Tensor.Zeros([5, 8], device: Dev), Tensor.Zeros([5, 8], device: Dev))).Message);
        Assert.Contains("(B, T, H, D)", Assert.Throws<TorchException>(() => F.Rotary(Tensor.Zeros([4, 2, 8], device: Dev), ok, ok)).Message);
        Assert.Contains("Float", Assert.Throws<TorchException>(() => F.Rotary(x, ok.To(ScalarType.BFloat16), ok.To(ScalarType.BFloat16))).Message);
        Assert.Contains("differ in shape", Assert.Throws<TorchException>(() => F.SwiGlu(ok, Tensor.Zeros([8, 4], device: Dev))).Message);
    }
}
