using FineTune.Domain.Models;
using FineTune.Worker.Torch;

namespace FineTune.Worker.Training.Model;

// A Llama-family decoder (Llama, Mistral, Qwen2) in one file, nanoGPT style. Module and parameter names follow the
// Hugging Face checkpoints exactly, so a state dict loads by name and adapters address modules by their HF path.
// Base weights are frozen: only adapter tensors (owned by the adapter method) are trained.

/// <summary>What an adapter method plugs into a <see cref="Linear"/>: gets the input and the frozen output, returns the adapted output.</summary>
public interface ILinearAdapter
{
    Tensor Forward(Tensor x, Tensor baseOutput);
}

/// <summary>An adapter that computes the whole output from x itself (Bat: one matmul with W + ΔW), so the base product
/// is not computed as well.</summary>
public interface IWholeLinearAdapter : ILinearAdapter
{
    /// <summary>The adapted output, or null to take the usual path (base product, then <see cref="ILinearAdapter.Forward"/>).</summary>
    Tensor? ForwardWhole(Tensor x);
}

/// <summary>y = x Wᵀ + b with a frozen W (out, in), and an optional adapter hook.</summary>
public sealed class Linear : Module
{
    public Tensor Weight { get; }
    public Tensor? Bias { get; }
    public ILinearAdapter? Adapter { get; set; }
    public long InFeatures => Weight.Size(1);
    public long OutFeatures => Weight.Size(0);

    public Linear(Tensor weight, Tensor? bias)
    {
        Weight = RegisterParameter("weight", weight, trainable: false);
        if (bias is not null) Bias = RegisterParameter("bias", bias, trainable: false);
    }

    public Tensor Forward(Tensor x)
    {
        if (Adapter is IWholeLinearAdapter whole && whole.ForwardWhole(x) is { } adapted) return adapted;
        var y = F.Linear(x, Weight, Bias);
        return Adapter is null ? y : Adapter.Forward(x, y);
    }
}

public sealed class Embedding : Module
{
    public Tensor Weight { get; }
    public Embedding(Tensor weight) => Weight = RegisterParameter("weight", weight, trainable: false);
    public Tensor Forward(Tensor ids) => F.Embedding(Weight, ids);
}

/// <summary>RMSNorm computed in fp32 (as HF does), cast back to the input dtype.</summary>
public sealed class RmsNorm : Module
{
    private readonly double _eps;
    public Tensor Weight { get; }
    public RmsNorm(Tensor weight, double eps) => (Weight, _eps) = (RegisterParameter("weight", weight, trainable: false), eps);
    public Tensor Forward(Tensor x) => F.RmsNorm(x, Weight, _eps);
}

/// <summary>Rotary position embedding, HF convention (rotate_half over the two halves of the head dimension).</summary>
public sealed class Rotary
{
    private readonly float[] _invFreq;
    public Rotary(ModelConfig c) => _invFreq = InverseFrequencies(c);

    /// <summary>cos and sin tables (T, headDim) for positions 0..T-1, computed in fp32 then cast to <paramref name="dtype"/>.</summary>
    public (Tensor Cos, Tensor Sin) Tables(long t, Device device, ScalarType dtype)
    {
        var pos = Tensor.Arange(0, t, 1, ScalarType.Float32, device);
        using var inv = Tensor.From(_invFreq).To(device);
        var freqs = pos.Unsqueeze(1) * inv.Unsqueeze(0);
        var emb = Tensor.Cat([freqs, freqs], -1);
        return (emb.Cos().To(dtype), emb.Sin().To(dtype));
    }

    /// <summary>The reference formula on x (B, H, T, D) with cos, sin broadcastable to it ((T, D) or (B, 1, T, D)):
    /// what <see cref="F.Rotary"/> computes as one fused node, and what the tests check it against.</summary>
    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        var half = x.Size(-1) / 2;
        var rotated = Tensor.Cat([-x.Narrow(-1, half, half), x.Narrow(-1, 0, half)], -1);
        return x * cos + rotated * sin;
    }

    /// <summary>1/θ^(2i/d), with HF's "linear" and "llama3" rope scaling.</summary>
    public static float[] InverseFrequencies(ModelConfig c)
    {
        var d = c.HeadDim;
        var inv = new float[d / 2];
        for (var i = 0; i < inv.Length; i++) inv[i] = (float)(1.0 / Math.Pow(c.EffectiveRopeTheta, (float)(2 * i) / d));
        var rs = c.EffectiveRopeScaling;
        switch (rs?.Kind)
        {
            case null or "default":
                break;
            case "linear":
                for (var i = 0; i < inv.Length; i++) inv[i] = (float)(inv[i] / rs.Factor);
                break;
            case "llama3":
                double oldLen = rs.OriginalMaxPositionEmbeddings ?? 8192;
                double lowWavelen = oldLen / rs.LowFreqFactor, highWavelen = oldLen / rs.HighFreqFactor;
                for (var i = 0; i < inv.Length; i++)
                {
                    var wavelen = 2 * Math.PI / inv[i];
                    var scaled = wavelen > lowWavelen ? inv[i] / rs.Factor : inv[i];
                    if (!(wavelen < highWavelen) && !(wavelen > lowWavelen))
                    {
                        var smooth = (oldLen / wavelen - rs.LowFreqFactor) / (rs.HighFreqFactor - rs.LowFreqFactor);
                        scaled = (1 - smooth) * scaled / rs.Factor + smooth * scaled;
                    }
                    inv[i] = (float)scaled;
                }
                break;
            default:
                throw new InvalidDataException($"unsupported rope_scaling type '{rs.Kind}'");
        }
        return inv;
    }
}

public sealed class Attention : Module
{
    private readonly int _heads, _kvHeads, _headDim;
    public Linear QProj { get; }
    public Linear KProj { get; }
    public Linear VProj { get; }
    public Linear OProj { get; }

    internal Attention(ModelConfig c, WeightSource w, string p)
    {
        (_heads, _kvHeads, _headDim) = (c.NumAttentionHeads, c.KvHeads, c.HeadDim);
        QProj = RegisterModule("q_proj", w.Linear($"{p}.q_proj", c.QkvBias));
        KProj = RegisterModule("k_proj", w.Linear($"{p}.k_proj", c.QkvBias));
        VProj = RegisterModule("v_proj", w.Linear($"{p}.v_proj", c.QkvBias));
        OProj = RegisterModule("o_proj", w.Linear($"{p}.o_proj", c.AttentionBias));
    }

    /// <param name="mask">Null: causal attention. Else a Bool (B, 1, T, T) mask of the positions each one may attend
    /// (packed rows: causal within each example, see <see cref="Llama.PackedMask"/>).</param>
    public Tensor Forward(Tensor x, Tensor cos, Tensor sin, Tensor? mask = null)
    {
        long b = x.Size(0), t = x.Size(1);
        // Rotary on the contiguous (B, T, H, D) projections, before the transpose to (B, H, T, D): one fused node
        // (Rotary.Apply is its reference).
        var q = F.Rotary(QProj.Forward(x).View(b, t, _heads, _headDim), cos, sin).Transpose(1, 2);
        var k = F.Rotary(KProj.Forward(x).View(b, t, _kvHeads, _headDim), cos, sin).Transpose(1, 2);
        var v = VProj.Forward(x).View(b, t, _kvHeads, _headDim).Transpose(1, 2);
        // Grouped-query attention (each kv head serves heads/kvHeads query heads, HF repeat_kv) inside the fused kernel
        // where libtorch has it, so the repeated k and v are never materialised. Unpacked batches are right-padded, so
        // causal alone keeps a real token from seeing a pad (pads come after it; their labels are -100); packed rows
        // pass their block-diagonal mask.
        var y = mask is null ? F.GroupedQueryAttention(q, k, v, isCausal: true) : F.GroupedQueryAttention(q, k, v, mask);
        return OProj.Forward(y.Transpose(1, 2).Reshape(b, t, _heads * _headDim));
    }
}

public sealed class Mlp : Module
{
    public Linear GateProj { get; }
    public Linear UpProj { get; }
    public Linear DownProj { get; }

    internal Mlp(ModelConfig c, WeightSource w, string p)
    {
        GateProj = RegisterModule("gate_proj", w.Linear($"{p}.gate_proj", c.MlpBias));
        UpProj = RegisterModule("up_proj", w.Linear($"{p}.up_proj", c.MlpBias));
        DownProj = RegisterModule("down_proj", w.Linear($"{p}.down_proj", c.MlpBias));
    }

    // F.SwiGlu is silu(gate)·up as one node (one kernel each way on CUDA).
    public Tensor Forward(Tensor x) => DownProj.Forward(F.SwiGlu(GateProj.Forward(x), UpProj.Forward(x)));
}

public sealed class DecoderLayer : Module
{
    public RmsNorm InputLayernorm { get; }
    public Attention SelfAttn { get; }
    public RmsNorm PostAttentionLayernorm { get; }
    public Mlp Mlp { get; }

    internal DecoderLayer(ModelConfig c, WeightSource w, string p)
    {
        InputLayernorm = RegisterModule("input_layernorm", w.Norm($"{p}.input_layernorm", c.RmsNormEps));
        SelfAttn = RegisterModule("self_attn", new Attention(c, w, $"{p}.self_attn"));
        PostAttentionLayernorm = RegisterModule("post_attention_layernorm", w.Norm($"{p}.post_attention_layernorm", c.RmsNormEps));
        Mlp = RegisterModule("mlp", new Mlp(c, w, $"{p}.mlp"));
    }

    public Tensor Forward(Tensor x, Tensor cos, Tensor sin, Tensor? mask = null)
    {
        // The layer's intermediates (projections, rotary products, casts, adapter terms, MLP activations) are freed as
        // soon as the layer is done, as Python's reference counting frees them: autograd holds what backward needs on
        // its own. Left to the step's scope, every layer's would stay alive through backward (measured on the 1B
        // benchmark: 58 GB peak for LoRA against PEFT's 36 GB).
        using var scope = DisposeScope.Begin();
        var h = x + SelfAttn.Forward(InputLayernorm.Forward(x), cos, sin, mask);
        return (h + Mlp.Forward(PostAttentionLayernorm.Forward(h))).MoveToOuterScope();
    }

    private long _checkpointId;

    /// <summary><see cref="Forward"/> under activation checkpointing: only the layer's input is kept for backward,
    /// which runs the layer again (same dropout masks).</summary>
    public Tensor ForwardCheckpointed(Tensor x, Tensor cos, Tensor sin, Tensor? mask = null)
    {
        if (_checkpointId == 0)
            _checkpointId = ActivationCheckpoint.Register(xs => [Forward(xs[0], xs[1], xs[2], xs.Length > 3 ? xs[3] : null)]);
        return (mask is null ? ActivationCheckpoint.Run(_checkpointId, x, cos, sin)
                             : ActivationCheckpoint.Run(_checkpointId, x, cos, sin, mask))[0];
    }

    public override void Dispose()
    {
        if (_checkpointId != 0) ActivationCheckpoint.Unregister(_checkpointId);
        _checkpointId = 0;
        base.Dispose();
    }
}

/// <summary>Holds modules under names "0", "1", … so that parameter paths read model.layers.N.….</summary>
public sealed class ModuleList<T> : Module where T : Module
{
    private readonly List<T> _items = [];
    public void Add(T m) => _items.Add(RegisterModule(_items.Count.ToString(), m));
    public int Count => _items.Count;
    public T this[int i] => _items[i];
}

/// <summary>The HF "model." part: embeddings, decoder layers, final norm.</summary>
public sealed class LlamaModel : Module
{
    public Embedding EmbedTokens { get; }
    public ModuleList<DecoderLayer> Layers { get; }
    public RmsNorm Norm { get; }

    internal LlamaModel(ModelConfig c, WeightSource w)
    {
        EmbedTokens = RegisterModule("embed_tokens", new Embedding(w.Take("model.embed_tokens.weight")));
        Layers = RegisterModule("layers", new ModuleList<DecoderLayer>());
        for (var i = 0; i < c.NumHiddenLayers; i++) Layers.Add(new DecoderLayer(c, w, $"model.layers.{i}"));
        Norm = RegisterModule("norm", w.Norm("model.norm", c.RmsNormEps));
    }
}

/// <summary>LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM.</summary>
public sealed class Llama : Module
{
    public ModelConfig Config { get; }
    public LlamaModel Model { get; }
    /// <summary>Null when the embeddings are tied (the head then reuses <c>model.embed_tokens.weight</c>).</summary>
    public Linear? LmHead { get; }
    public Device Device { get; }
    public ScalarType DType { get; }
    /// <summary>Run every decoder layer under activation checkpointing while autograd is on: activation memory drops
    /// to one hidden state per layer, for about a third more compute (a second forward in backward).</summary>
    public bool GradientCheckpointing { get; set; }
    private readonly Rotary _rotary;
    // cos/sin tables per dtype, on the device, for the longest sequence seen: computed once instead of per forward
    // (building them needs a host-to-device copy, which would make the host wait for the GPU every step).
    private readonly Dictionary<ScalarType, (Tensor Cos, Tensor Sin)> _rope = [];

    private Llama(ModelConfig c, WeightSource w, Device device, ScalarType dtype)
    {
        (Config, Device, DType) = (c, device, dtype);
        _rotary = new Rotary(c);
        Model = RegisterModule("model", new LlamaModel(c, w));
        if (!c.TieWordEmbeddings) LmHead = RegisterModule("lm_head", w.Linear("lm_head", bias: false));
    }

    /// <summary>Builds the model from a state dict (HF names); takes ownership of the tensors it uses and frees the rest.</summary>
    public static Llama FromWeights(ModelConfig config, Dictionary<string, Tensor> weights, Device device, ScalarType dtype)
    {
        var problem = config.Problems().FirstOrDefault();
        if (problem is not null) throw new InvalidDataException($"config.json: {problem}");
        var source = new WeightSource(weights, config);
        try
        {
            var model = new Llama(config, source, device, dtype);
            source.CheckAllUsed();
            return model;
        }
        finally { source.DisposeUnused(); }
    }

    /// <summary>Loads config.json and the safetensors weights of an HF model folder, in <paramref name="dtype"/> on <paramref name="device"/>.</summary>
    public static Llama Load(string folder, Device device, ScalarType dtype)
    {
        var config = ModelConfig.Load(folder);
        return FromWeights(config, Safetensors.LoadModelFolder(folder, device, dtype), device, dtype);
    }

    /// <summary>Logits (B, T, vocab) for input ids (B, T).</summary>
    /// <param name="positions">Position ids (B, T) for packed rows (restarting at each example); null: 0..T-1.</param>
    /// <param name="mask">Attention mask for packed rows (<see cref="PackedMask"/>); null: causal.</param>
    public Tensor Forward(Tensor ids, Tensor? positions = null, Tensor? mask = null)
    {
        var h = Hidden(ids, positions, mask);
        return LmHead is not null ? LmHead.Forward(h) : F.Linear(h, Model.EmbedTokens.Weight);
    }

    /// <summary>Final hidden states (B, T, hidden).</summary>
    public Tensor Hidden(Tensor ids, Tensor? positions = null, Tensor? mask = null)
    {
        if (Config.SequenceLengthProblem((int)ids.Size(1)) is { } problem) throw new ArgumentException(problem);
        var x = Model.EmbedTokens.Forward(ids);
        var (cos, sin) = RopeTables(ids.Size(1), x.DType);
        if (positions is not null)
        {
            // Per-token rotary angles (B, T, headDim): each packed example starts again at position 0.
            cos = F.Embedding(cos, positions);
            sin = F.Embedding(sin, positions);
        }
        var checkpoint = GradientCheckpointing && Torch.Torch.IsGradEnabled;
        for (var i = 0; i < Model.Layers.Count; i++)
            x = checkpoint ? Model.Layers[i].ForwardCheckpointed(x, cos, sin, mask) : Model.Layers[i].Forward(x, cos, sin, mask);
        return Model.Norm.Forward(x);
    }

    /// <summary>cos and sin (T, headDim) for positions 0..T-1: views of cached tables (the same values as
    /// <see cref="Rotary.Tables"/>, which are elementwise in the position).</summary>
    private (Tensor Cos, Tensor Sin) RopeTables(long t, ScalarType dtype)
    {
        if (!_rope.TryGetValue(dtype, out var tables) || tables.Cos.Size(0) < t)
        {
            if (tables.Cos is not null) { tables.Cos.Dispose(); tables.Sin.Dispose(); }
            var length = Math.Max(t, 256);
            length = (length + 255) / 256 * 256;
            using (DisposeScope.Begin())
            using (Torch.Torch.NoGrad())
            {
                var (c, s) = _rotary.Tables(length, Device, dtype);
                tables = (DisposeScope.Keep(c), DisposeScope.Keep(s));
            }
            _rope[dtype] = tables;
        }
        return (tables.Cos.Narrow(0, 0, t), tables.Sin.Narrow(0, 0, t));
    }

    public override void Dispose()
    {
        foreach (var (c, s) in _rope.Values) { c.Dispose(); s.Dispose(); }
        _rope.Clear();
        base.Dispose();
    }

    /// <summary>
    /// The attention mask of packed rows from their segment ids (B, T): a position attends to the earlier positions of
    /// its own segment only (block-diagonal and causal), so packed examples never see each other. Padding carries its
    /// own segment id, so every row of the mask has at least its diagonal (no all-masked softmax).
    /// </summary>
    public static Tensor PackedMask(Tensor segments)
    {
        using var scope = DisposeScope.Begin();
        long t = segments.Size(1);
        var same = segments.Unsqueeze(2).Eq(segments.Unsqueeze(1));
        var causal = Tensor.Ones([t, t], ScalarType.Bool, segments.Device).Tril();
        return same.MaskedFill(causal.LogicalNot(), 0).Unsqueeze(1).MoveToOuterScope();
    }

    /// <summary>
    /// Next-token cross-entropy over positions whose label is not -100 (labels aligned with ids; shifted here), in fp32.
    /// <paramref name="reduction"/> "sum" lets the caller normalise over a whole accumulated step.
    /// </summary>
    public Tensor Loss(Tensor ids, Tensor labels, string reduction = "mean", Tensor? positions = null, Tensor? mask = null)
    {
        var head = LmHead;
        if (reduction == "none" || head is { Adapter: not null } || head?.Bias is not null)
            return LossFromLogits(ids, labels, reduction, positions, mask);
        var h = Hidden(ids, positions, mask);
        long t = ids.Size(1);
        // Shift the labels rather than the logits (as HF does): position i predicts label i+1, the last predicts nothing.
        var targets = labels.Narrow(1, 1, t - 1).Pad([0, 1], -100).Reshape(-1);
        var sum = F.LinearCrossEntropy(h.Reshape(-1, h.Size(-1)), head?.Weight ?? Model.EmbedTokens.Weight, targets, -100);
        return reduction switch
        {
            "sum" => sum,
            "mean" => sum / targets.Ne(-100).Sum(),
            _ => throw new ArgumentException($"reduction must be mean, sum or none, not '{reduction}'", nameof(reduction)),
        };
    }

    /// <summary>The same loss from the full (B, T, vocab) logits: per-token losses ("none"), and the reference the fused
    /// path is tested against.</summary>
    public Tensor LossFromLogits(Tensor ids, Tensor labels, string reduction = "mean", Tensor? positions = null, Tensor? mask = null)
    {
        var logits = Forward(ids, positions, mask);
        long t = ids.Size(1), v = logits.Size(-1);
        var shifted = logits.Narrow(1, 0, t - 1).Reshape(-1, v).To(ScalarType.Float32);
        var targets = labels.Narrow(1, 1, t - 1).Reshape(-1);
        return F.CrossEntropy(shifted, targets, -100, reduction);
    }

    /// <summary>The linear module at an HF path such as model.layers.0.self_attn.q_proj.</summary>
    public Linear LinearAt(string path) =>
        GetSubmodule(path) as Linear ?? throw new ArgumentException($"no linear module at '{path}'");
}

/// <summary>Hands checkpoint tensors to modules by HF name, with clear errors for missing or mis-shaped ones.</summary>
internal sealed class WeightSource(Dictionary<string, Tensor> weights, ModelConfig config)
{
    private readonly HashSet<string> _used = [];
    private readonly Dictionary<string, long[]> _expected = ExpectedShapes(config);

    public Tensor Take(string name)
    {
        if (!weights.TryGetValue(name, out var t))
            throw new InvalidDataException($"model weights lack tensor '{name}'");
        if (_expected.TryGetValue(name, out var shape) && !shape.SequenceEqual(t.Shape))
            throw new InvalidDataException(
                $"tensor '{name}' has shape ({string.Join(", ", t.Shape)}), config.json implies ({string.Join(", ", shape)})");
        _used.Add(name);
        return t;
    }

    public Linear Linear(string path, bool bias) => new(Take($"{path}.weight"), bias ? Take($"{path}.bias") : null);
    public RmsNorm Norm(string path, double eps) => new(Take($"{path}.weight"), eps);

    public void CheckAllUsed()
    {
        // Old checkpoints store rotary inv_freq buffers; tied models may still store lm_head.weight.
        var unexpected = weights.Keys.Where(k => !_used.Contains(k) && !k.EndsWith("rotary_emb.inv_freq")
                                                  && !(config.TieWordEmbeddings && k == "lm_head.weight")).ToList();
        if (unexpected.Count > 0)
            throw new InvalidDataException($"model weights have unexpected tensors: {string.Join(", ", unexpected.Take(5))}" +
                                           (unexpected.Count > 5 ? $" (+{unexpected.Count - 5} more)" : ""));
    }

    public void DisposeUnused()
    {
        foreach (var (k, t) in weights) if (!_used.Contains(k)) t.Dispose();
    }

    private static Dictionary<string, long[]> ExpectedShapes(ModelConfig c)
    {
        var d = new Dictionary<string, long[]>
        {
            ["model.embed_tokens.weight"] = [c.VocabSize, c.HiddenSize],
            ["model.norm.weight"] = [c.HiddenSize],
            ["lm_head.weight"] = [c.VocabSize, c.HiddenSize],
        };
        for (var l = 0; l < c.NumHiddenLayers; l++)
        {
            foreach (var m in c.LayerLinears())
            {
                var path = ModelConfig.ModulePath(l, m.Name);
                d[$"{path}.weight"] = [m.Out, m.In];
                d[$"{path}.bias"] = [m.Out];
            }
            d[$"model.layers.{l}.input_layernorm.weight"] = [c.HiddenSize];
            d[$"model.layers.{l}.post_attention_layernorm.weight"] = [c.HiddenSize];
        }
        return d;
    }
}
