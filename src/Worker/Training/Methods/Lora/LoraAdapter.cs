using System.Text.Json.Nodes;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Training.Methods.Lora;

/// <summary>LoRA: y = base + s·(dropout(x) Aᵀ) Bᵀ with A (r, in), B (out, r). Adapter tensors are fp32 whatever the
/// base dtype (as PEFT's autocast_adapter_dtype does), the sum is cast back to the base output's dtype.</summary>
public sealed class LoraLayer : IAdapterLayer
{
    public Linear Base { get; }
    public Tensor A { get; }
    public Tensor B { get; }
    public double Scaling { get; }
    public double Dropout { get; }
    public bool Merged { get; set; }
    public bool Training { get; set; } = true;
    public IReadOnlyList<(string Suffix, Tensor Tensor)> Tensors => [("lora_A.weight", A), ("lora_B.weight", B)];

    public LoraLayer(Linear linear, int r, double scaling, double dropout, Generator gen)
    {
        (Base, Scaling, Dropout) = (linear, scaling, dropout);
        var device = linear.Weight.Device;
        // nn.Linear's default init (kaiming_uniform, a=√5) gives U(−1/√in, 1/√in); B = 0 makes the adapter a no-op at start.
        var bound = 1.0 / Math.Sqrt(linear.InFeatures);
        using var a = Tensor.Empty([r, linear.InFeatures]).Uniform_(-bound, bound, gen);
        A = Owned(a.To(device, ScalarType.Float32).Clone());
        B = Owned(Tensor.Zeros([linear.OutFeatures, r], ScalarType.Float32, device));
    }

    internal static Tensor Owned(Tensor t)
    {
        DisposeScope.Keep(t);
        return t.RequiresGrad_();
    }

    public Tensor Forward(Tensor x, Tensor baseOutput)
    {
        if (Merged) return baseOutput;
        // In the adapter's dtype (fp32 masters by default, bf16 with adapterDtype bf16); the fp32 cast of an input
        // shared by several modules is made once.
        var h = AdapterInput.As(x, A.DType);
        if (Dropout > 0) h = F.Dropout(h, Dropout, Training);
        var y = baseOutput.Add(F.Linear(F.Linear(h, A), B), Scaling);   // base + s·(h Aᵀ) Bᵀ in one kernel
        return y.DType == baseOutput.DType ? y : y.To(baseOutput.DType);
    }

    public Tensor DeltaWeight() => B.MatMul(A) * Scaling;

    public void Dispose()
    {
        A.Dispose();
        B.Dispose();
    }
}

public sealed class LoraAdapter(LoraMethod spec) : AdapterMethodBase(spec)
{
    public LoraMethod Lora { get; } = spec;

    protected override IAdapterLayer CreateLayer(Linear linear, Generator gen) =>
        new LoraLayer(linear, Lora.R, Lora.Scaling, Lora.Dropout, gen);

    protected override JsonObject AdapterConfig(string baseModelName) =>
        LoraConfig(baseModelName, TargetModules, Lora.R, Lora.Alpha, Lora.Dropout, Lora.Rslora);

    /// <summary>adapter_config.json of a plain PEFT LoRA (also used by other methods' LoRA exports).</summary>
    public static JsonObject LoraConfig(string baseModelName, string[] targetModules, int r, double alpha, double dropout, bool rslora)
    {
        var c = AdapterFiles.CommonConfig("LORA", baseModelName, targetModules);
        c["r"] = r;
        c["lora_alpha"] = alpha;
        c["lora_dropout"] = dropout;
        c["use_rslora"] = rslora;
        c["use_dora"] = false;
        c["init_lora_weights"] = true;
        c["fan_in_fan_out"] = false;
        c["rank_pattern"] = new JsonObject();
        c["alpha_pattern"] = new JsonObject();
        return c;
    }
}
