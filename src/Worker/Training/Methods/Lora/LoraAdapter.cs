using System.Text.Json.Nodes;
using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Worker.Torch;
using FineTune.Worker.Torch.Optim;
using FineTune.Worker.Training.Model;

namespace FineTune.Worker.Training.Methods.Lora;

/// <summary>LoRA: y = base + s·(dropout(x) Aᵀ) Bᵀ with A (r, in), B (out, r). Adapter tensors are fp32 whatever the
/// base dtype (as PEFT's autocast_adapter_dtype does), the sum is cast back to the base output's dtype; with
/// adapterDtype mixed the math runs in the base's dtype over the fp32 tensors (<see cref="IAdapterLayer.Mixed"/>).
/// PiSSA and OLoRA start A, B from factors of W and replace W by the residual W − s·B₀A₀ (as PEFT's pissa_init and
/// olora_init do), so the model's output at init is unchanged up to rounding; A₀, B₀ are kept for the LoRA export.</summary>
public sealed class LoraLayer : IAdapterLayer, IWholeLinearAdapter
{
    public Linear Base { get; }
    public Tensor A { get; }
    public Tensor B { get; }
    /// <summary>A and B at init when the init changed the base weight (PiSSA, OLoRA): W_original = W + s·B₀A₀.</summary>
    public Tensor? InitialA { get; }
    public Tensor? InitialB { get; }
    public double Scaling { get; }
    public double Dropout { get; }
    public bool Merged { get; set; }
    public bool Training { get; set; } = true;
    public long DropoutSeed { get; set; }
    public bool Mixed { get; set; }
    public IReadOnlyList<(string Suffix, Tensor Tensor)> Tensors => [("lora_A.weight", A), ("lora_B.weight", B)];

    public LoraLayer(Linear linear, int r, double scaling, double dropout, Generator gen, string init = LoraFamilyMethod.InitDefault)
    {
        (Base, Scaling, Dropout) = (linear, scaling, dropout);
        if (init is LoraFamilyMethod.InitPissa or LoraFamilyMethod.InitOlora)
        {
            var (a, b) = ResidualFactors(linear, r, scaling, init);
            (A, B) = (Owned(a), Owned(b));
            InitialA = DisposeScope.Keep(a.Detach().Clone());
            InitialB = DisposeScope.Keep(b.Detach().Clone());
        }
        else
        {
            var (a, b) = RandomFactors(linear, r, init, gen);
            (A, B) = (Owned(a), Owned(b));
        }
    }

    /// <summary>
    /// default: A as nn.Linear's init (kaiming_uniform, a=√5, i.e. U(−1/√in, 1/√in)); gaussian: A ~ N(0, (1/r)²) as PEFT
    /// (std 1/r). B = 0 in both, so the adapter is a no-op at start. Drawn on the CPU from <paramref name="gen"/>.
    /// </summary>
    internal static (Tensor A, Tensor B) RandomFactors(Linear linear, int r, string init, Generator gen)
    {
        var device = linear.Weight.Device;
        using var draw = Tensor.Empty([r, linear.InFeatures]);
        if (init == LoraFamilyMethod.InitGaussian) draw.Normal_(0, 1.0 / r, gen);
        else if (init == LoraFamilyMethod.InitDefault)
        {
            var bound = 1.0 / Math.Sqrt(linear.InFeatures);
            draw.Uniform_(-bound, bound, gen);
        }
        else throw new ArgumentException($"init '{init}' draws no random factors");
        return (DisposeScope.Keep(draw.To(device, ScalarType.Float32).Clone()),
                DisposeScope.Keep(Tensor.Zeros([linear.OutFeatures, r], ScalarType.Float32, linear.Weight.Device)));
    }

    /// <summary>
    /// PEFT's pissa_init and olora_init, in fp32 on the weight's device, and W ← (W − s·B·A) cast back to W's dtype.
    /// PiSSA: W = U S Vᵀ (full SVD), S_r' = S_r / s, A = diag(√S_r')·V_rᵀ, B = U_r·diag(√S_r'), so s·B·A is the top-r
    /// part of W. OLoRA: W = Q R (reduced QR), A = R[:r], B = Q[:, :r] (unscaled, as PEFT).
    /// Both are deterministic functions of W (a singular vector's or Q column's sign flip changes A and B but not
    /// B·A, hence not W − s·B·A): a resumed run recomputes the same residual from the same base weights.
    /// </summary>
    internal static (Tensor A, Tensor B) ResidualFactors(Linear linear, int r, double scaling, string init)
    {
        using var noGrad = Torch.Torch.NoGrad();
        using var scope = DisposeScope.Begin();
        var w = linear.Weight.To(ScalarType.Float32);
        Tensor a, b;
        if (init == LoraFamilyMethod.InitPissa)
        {
            var (u, s, vh) = Linalg.Svd(w);
            var root = (s.Narrow(0, 0, r) / scaling).Sqrt();
            a = root.Unsqueeze(1) * vh.Narrow(0, 0, r);
            b = u.Narrow(1, 0, r) * root.Unsqueeze(0);
        }
        else if (init == LoraFamilyMethod.InitOlora)
        {
            var (q, rr) = Linalg.Qr(w);
            a = rr.Narrow(0, 0, r);
            b = q.Narrow(1, 0, r);
        }
        else throw new ArgumentException($"init '{init}' does not factor the base weight");
        a = a.Contiguous();
        b = b.Contiguous();
        var residual = w - b.MatMul(a) * scaling;
        linear.Weight.Copy_(residual.To(linear.Weight.DType));
        return (DisposeScope.Keep(a.Clone()), DisposeScope.Keep(b.Clone()));
    }

    internal static Tensor Owned(Tensor t)
    {
        DisposeScope.Keep(t);
        return t.RequiresGrad_();
    }

    /// <summary>Whenever the math runs in x's dtype (mixed, bf16 adapters, an fp32 base) and no dropout applies, base and
    /// adapter are one fused node (<see cref="AdapterOps.LoraLinear"/>); fp32 adapters over a bf16 base on CUDA take its
    /// exact form (<see cref="AdapterOps.LoraLinearExact"/>); otherwise null: the base product, then <see cref="Forward"/>.</summary>
    public Tensor? ForwardWhole(Tensor x)
    {
        if (Merged || (Dropout > 0 && Training) || x.DType != Base.Weight.DType) return null;
        if (Mixed || A.DType == x.DType) return AdapterOps.LoraLinear(x, Base.Weight, Base.Bias, A, B, Scaling);
        // fp32 adapter math over a bf16 base: the same node on bf16 tensor cores over exact three-term splits.
        if (AdapterOps.LoraLinearExactApplies(x, A.DType))
            return AdapterOps.LoraLinearExact(x, Base.Weight, Base.Bias, A, B, Scaling);
        return null;
    }

    public Tensor Forward(Tensor x, Tensor baseOutput)
    {
        if (Merged) return baseOutput;
        // fp32: in the adapter's dtype, the fp32 cast of an input shared by several modules made once. mixed: in x's
        // dtype with A and B cast for the products (r × in and out × r: small), so the (tokens × features) input and
        // output are never copied to fp32. bf16: the tensors are bf16 already.
        if (Mixed && x.DType != A.DType)
        {
            var hm = Dropout > 0 ? F.Dropout(x, Dropout, Training, DropoutSeed) : x;
            return baseOutput.Add(AdapterInput.LowRank(hm, A, B), Scaling);
        }
        var h = AdapterInput.As(x, A.DType);
        if (Dropout > 0) h = F.Dropout(h, Dropout, Training, DropoutSeed);
        return AdapterInput.AddInto(baseOutput, AdapterInput.ScaledLowRank(h, A, B, Scaling));
    }

    public Tensor DeltaWeight() => B.MatMul(A) * Scaling;

    public void Dispose()
    {
        A.Dispose();
        B.Dispose();
        InitialA?.Dispose();
        InitialB?.Dispose();
    }
}

public sealed class LoraAdapter(LoraMethod spec) : AdapterMethodBase(spec)
{
    public LoraMethod Lora { get; } = spec;

    protected override IAdapterLayer CreateLayer(Linear linear, Generator gen) =>
        new LoraLayer(linear, Lora.R, Lora.Scaling, Lora.Dropout, gen, Lora.Init);

    public override IReadOnlyList<ParamGroup> ParamGroups(Hyperparameters hyper) =>
        LoraPlus.Groups(TrainableTensors, hyper, Lora.LoraPlusRatio);

    protected override JsonObject AdapterConfig(string baseModelName) =>
        LoraConfig(baseModelName, TargetModules, Lora.R, Lora.Alpha, Lora.Dropout, Lora.Rslora, InitLoraWeights(Lora.Init));

    /// <summary>
    /// <c>lora/</c>, with the scale folded into B (ΔW = B'·A', lora_alpha = rank). default/gaussian: A' = A, B' = s·B,
    /// the same ΔW exactly. PiSSA/OLoRA: the native A, B are against the residual W − s·B₀A₀, so the portable form
    /// against the ORIGINAL W is the rank-2r LoRA A' = [A; A₀], B' = s·[B, −B₀] (ΔW' = s·(B·A − B₀·A₀)); this is
    /// PEFT's path_initial_model_for_weight_conversion form with alpha 2α (2r here, the scale being folded).
    /// </summary>
    protected override IReadOnlyList<string> SaveExports(string dir, string baseModelName)
    {
        using var scope = DisposeScope.Begin();
        using var noGrad = Torch.Torch.NoGrad();
        var modules = new List<LoraExport.Module>();
        foreach (var (path, layer) in Layers)
        {
            var l = (LoraLayer)layer;
            if (l.InitialA is null || l.InitialB is null)
                modules.Add(new LoraExport.Module(path, l.A.Detach(), l.B.Detach() * l.Scaling));
            else
                modules.Add(new LoraExport.Module(path, Tensor.Cat([l.A.Detach(), l.InitialA], 0),
                    Tensor.Cat([l.B.Detach(), -l.InitialB], 1) * l.Scaling));
        }
        var note = Lora.ChangesBaseWeights
            ? $"{Lora.Init}: rank-2r LoRA against the original base weights, A' = [A; A0], B' = s*[B, -B0]"
            : null;
        var files = LoraExport.Write(dir, baseModelName, TargetModules, modules, out var info, note);
        ExportInfo = info;
        return files;
    }

    /// <summary>PEFT's init_lora_weights as it writes it: true for the default init, else the init's name.</summary>
    public static JsonNode InitLoraWeights(string init) =>
        init == LoraFamilyMethod.InitDefault ? JsonValue.Create(true) : JsonValue.Create(init);

    /// <summary>adapter_config.json of a plain PEFT LoRA (also used by other methods' LoRA exports).</summary>
    public static JsonObject LoraConfig(string baseModelName, string[] targetModules, int r, double alpha, double dropout, bool rslora,
                                        JsonNode? initLoraWeights = null, bool useDora = false)
    {
        var c = AdapterFiles.CommonConfig("LORA", baseModelName, targetModules);
        c["r"] = r;
        c["lora_alpha"] = alpha;
        c["lora_dropout"] = dropout;
        c["use_rslora"] = rslora;
        c["use_dora"] = useDora;
        c["init_lora_weights"] = initLoraWeights ?? JsonValue.Create(true);
        c["fan_in_fan_out"] = false;
        c["rank_pattern"] = new JsonObject();
        c["alpha_pattern"] = new JsonObject();
        return c;
    }
}

/// <summary>
/// LoRA+ (Hayou et al., arXiv 2402.12354; PEFT's create_loraplus_optimizer): B's learning rate is lr·ratio, everything
/// else (A, DoRA's magnitude) keeps lr; weight decay as the job says for both groups.
/// </summary>
public static class LoraPlus
{
    public const string BSuffix = ".lora_B.weight";

    public static IReadOnlyList<ParamGroup> Groups(IReadOnlyList<(string Name, Tensor Tensor)> trainable, Hyperparameters hyper, double? ratio)
    {
        if (ratio is not { } k)
            return [new ParamGroup("adapter", trainable.Select(t => t.Tensor).ToList(), hyper.LearningRate, hyper.WeightDecay)];
        var isB = trainable.ToLookup(t => t.Name.EndsWith(BSuffix, StringComparison.Ordinal), t => t.Tensor);
        return
        [
            new ParamGroup("lora_A", isB[false].ToList(), hyper.LearningRate, hyper.WeightDecay),
            new ParamGroup("lora_B", isB[true].ToList(), hyper.LearningRate * k, hyper.WeightDecay),
        ];
    }
}
