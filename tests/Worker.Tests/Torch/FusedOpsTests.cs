using FineTune.Domain.Models;
using FineTune.Worker.Tests.Training;
using FineTune.Worker.Torch;
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

    public static TheoryData<ScalarType, string> RotaryCases => new()
    {
        { ScalarType.Float32, "tables" }, { ScalarType.Float32, "random" }, { ScalarType.Float32, "per-row" },
        { ScalarType.BFloat16, "tables" }, { ScalarType.BFloat16, "random" }, { ScalarType.BFloat16, "per-row" },
    };

    /// <summary>x (B, T, H, D) = (2, 7, 3, 16) as the transposed view of a contiguous (B, H, T, D) tensor (so the op sees
    /// a non-contiguous input); cos/sin: the model's tables (T, D), random (T, D) tables whose halves differ (the kernel
    /// must read both), or per-row (B, T, D) tables gathered at packed positions. Reference: Rotary.Apply on the
    /// (B, H, T, D) view.</summary>
    [Theory, MemberData(nameof(RotaryCases))]
    public void Rotary_forward_and_gradient_equal_the_composite_formula(ScalarType dtype, string tables)
    {
        const int b = 2, t = 7, h = 3, d = 16;
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
