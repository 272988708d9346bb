namespace FineTune.Worker.Torch.Optim;

public sealed record ParamGroup(string Name, IReadOnlyList<Tensor> Parameters, double LearningRate, double WeightDecay = 0.0);

/// <summary>
/// AdamW with decoupled weight decay. The moment tensors live here (so the state can be checkpointed);
/// the update runs in native code under no-grad (fused kernel on CUDA with libtorch ≥ 2.1, foreach ops otherwise).
/// </summary>
public sealed unsafe class AdamW : IDisposable
{
    private readonly double _beta1, _beta2, _eps;
    private readonly Tensor[][] _expAvg, _expAvgSq;
    // StepCount when ResetState last cleared a parameter (0: never): its bias correction counts from there.
    private readonly long[][] _resetAt;
    private readonly double[] _lr;
    private bool _disposed;

    public AdamW(IReadOnlyList<ParamGroup> groups, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8)
    {
        Groups = groups;
        (_beta1, _beta2, _eps) = (beta1, beta2, eps);
        _lr = groups.Select(g => g.LearningRate).ToArray();
        _expAvg = groups.Select(g => g.Parameters.Select(NewState).ToArray()).ToArray();
        _expAvgSq = groups.Select(g => g.Parameters.Select(NewState).ToArray()).ToArray();
        _resetAt = groups.Select(g => new long[g.Parameters.Count]).ToArray();
    }

    private static Tensor NewState(Tensor p)
    {
        using var _ = Torch.NoGrad();
        return DisposeScope.Keep(Tensor.ZerosLike(p));
    }

    public IReadOnlyList<ParamGroup> Groups { get; }
    public long StepCount { get; private set; }

    /// <summary>Current learning rate of group <paramref name="group"/> (base × schedule factor).</summary>
    public double LearningRate(int group) => _lr[group];

    public void SetLearningRateFactor(double factor)
    {
        for (var i = 0; i < Groups.Count; i++) _lr[i] = Groups[i].LearningRate * factor;
    }

    public void Step()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        StepCount++;
        for (var g = 0; g < Groups.Count; g++)
        {
            var resetAt = _resetAt[g];
            // Parameters reset at different steps have different bias corrections: one native call per reset point
            // (almost always one call per group).
            foreach (var at in resetAt.Distinct())
            {
                var idx = Enumerable.Range(0, resetAt.Length).Where(i => resetAt[i] == at).ToArray();
                var ps = idx.Select(i => Groups[g].Parameters[i].Handle).ToArray();
                var m = idx.Select(i => _expAvg[g][i].Handle).ToArray();
                var v = idx.Select(i => _expAvgSq[g][i].Handle).ToArray();
                fixed (IntPtr* pp = ps, pm = m, pv = v)
                    Native.Check(Native.ft_adamw_step(pp, pm, pv, ps.Length, _lr[g], _beta1, _beta2, _eps, Groups[g].WeightDecay, StepCount - at));
            }
        }
        GC.KeepAlive(Groups);
        GC.KeepAlive(_expAvg);
        GC.KeepAlive(_expAvgSq);
    }

    /// <summary>
    /// Forgets the moments of <paramref name="parameters"/> (each must belong to a group) and restarts their bias
    /// correction, as a fresh AdamW would for a newly created parameter (XGBLoRA re-initialises its boosters every round).
    /// </summary>
    public void ResetState(IEnumerable<Tensor> parameters)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        using var _ = Torch.NoGrad();
        foreach (var p in parameters)
        {
            var found = false;
            for (var g = 0; g < Groups.Count && !found; g++)
                for (var i = 0; i < Groups[g].Parameters.Count && !found; i++)
                    if (ReferenceEquals(Groups[g].Parameters[i], p))
                    {
                        _expAvg[g][i].Zero_();
                        _expAvgSq[g][i].Zero_();
                        _resetAt[g][i] = StepCount;
                        found = true;
                    }
            if (!found) throw new ArgumentException($"tensor {p} is not a parameter of this optimizer", nameof(parameters));
        }
    }

    public void ZeroGrad() => OptimUtil.ZeroGrad(Groups);

    /// <summary>The moment tensors are the optimizer's own (do not dispose them); "step" and any "…reset_at" scalars are new.</summary>
    public Dictionary<string, Tensor> StateDict()
    {
        var d = new Dictionary<string, Tensor>();
        for (var g = 0; g < Groups.Count; g++)
            for (var i = 0; i < _expAvg[g].Length; i++)
            {
                d[$"g{g}.p{i}.exp_avg"] = _expAvg[g][i];
                d[$"g{g}.p{i}.exp_avg_sq"] = _expAvgSq[g][i];
                if (_resetAt[g][i] != 0) d[$"g{g}.p{i}.reset_at"] = Tensor.Scalar(_resetAt[g][i], ScalarType.Int64);
            }
        d["step"] = Tensor.Scalar(StepCount, ScalarType.Int64);
        return d;
    }

    public void LoadStateDict(IReadOnlyDictionary<string, Tensor> state)
    {
        if (!state.TryGetValue("step", out var step))
            throw new InvalidOperationException("AdamW state has no 'step' entry");
        using var _ = Torch.NoGrad();
        for (var g = 0; g < Groups.Count; g++)
            for (var i = 0; i < _expAvg[g].Length; i++)
                foreach (var (kind, target) in new[] { ("exp_avg", _expAvg[g][i]), ("exp_avg_sq", _expAvgSq[g][i]) })
                {
                    var key = $"g{g}.p{i}.{kind}";
                    if (!state.TryGetValue(key, out var src))
                        throw new InvalidOperationException($"AdamW state is missing '{key}'");
                    if (!src.Shape.SequenceEqual(target.Shape))
                        throw new InvalidOperationException(
                            $"AdamW state '{key}' has shape [{string.Join(",", src.Shape)}], expected [{string.Join(",", target.Shape)}]");
                    target.Copy_(src);
                }
        for (var g = 0; g < Groups.Count; g++)
            for (var i = 0; i < _resetAt[g].Length; i++)
                _resetAt[g][i] = state.TryGetValue($"g{g}.p{i}.reset_at", out var at) ? at.ItemLong() : 0;
        StepCount = step.ItemLong();
    }

    private static IntPtr[] Handles(IReadOnlyList<Tensor> ts)
    {
        var h = new IntPtr[ts.Count];
        for (var i = 0; i < h.Length; i++) h[i] = ts[i].Handle;
        return h;
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var t in _expAvg.SelectMany(x => x).Concat(_expAvgSq.SelectMany(x => x))) t.Dispose();
    }
}

/// <summary>SGD with optional momentum; weight decay is added to the gradient (classic L2).</summary>
public sealed unsafe class Sgd : IDisposable
{
    private readonly double _momentum;
    private readonly double[] _lr;
    private readonly Tensor[][]? _buffers;
    private bool _first = true, _disposed;

    public Sgd(IReadOnlyList<ParamGroup> groups, double momentum = 0)
    {
        Groups = groups;
        _momentum = momentum;
        _lr = groups.Select(g => g.LearningRate).ToArray();
        if (momentum != 0)
        {
            using var _ = Torch.NoGrad();
            _buffers = groups.Select(g => g.Parameters.Select(p => DisposeScope.Keep(Tensor.ZerosLike(p))).ToArray()).ToArray();
        }
    }

    public IReadOnlyList<ParamGroup> Groups { get; }

    public void SetLearningRateFactor(double factor)
    {
        for (var i = 0; i < Groups.Count; i++) _lr[i] = Groups[i].LearningRate * factor;
    }

    public void Step()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        for (var g = 0; g < Groups.Count; g++)
        {
            var ps = Groups[g].Parameters.Select(p => p.Handle).ToArray();
            var bs = _buffers?[g].Select(b => b.Handle).ToArray() ?? new IntPtr[ps.Length];
            fixed (IntPtr* pp = ps, pb = bs)
                Native.Check(Native.ft_sgd_step(pp, pb, ps.Length, _lr[g], _momentum, Groups[g].WeightDecay, _first ? 1 : 0));
        }
        _first = false;
        GC.KeepAlive(Groups);
    }

    public void ZeroGrad() => OptimUtil.ZeroGrad(Groups);

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        if (_buffers != null) foreach (var t in _buffers.SelectMany(x => x)) t.Dispose();
    }
}

internal static unsafe class OptimUtil
{
    internal static void ZeroGrad(IReadOnlyList<ParamGroup> groups)
    {
        var ps = groups.SelectMany(g => g.Parameters).Select(p => p.Handle).ToArray();
        fixed (IntPtr* pp = ps) Native.Check(Native.ft_zero_grad(pp, ps.Length));
        GC.KeepAlive(groups);
    }
}

public static unsafe class GradClip
{
    /// <summary>Scales all grads so their global L2 norm is at most <paramref name="maxNorm"/>, entirely on the device
    /// (multi-tensor norms; nothing is read back, so the host does not wait for the GPU).</summary>
    public static void ClipGradNormAsync(IReadOnlyList<Tensor> parameters, double maxNorm)
    {
        var ps = new IntPtr[parameters.Count];
        for (var i = 0; i < ps.Length; i++) ps[i] = parameters[i].Handle;
        fixed (IntPtr* pp = ps) Native.Check(Native.ft_clip_grad_norm_async(pp, ps.Length, maxNorm));
        GC.KeepAlive(parameters);
    }

    /// <summary>Scales all grads so their global L2 norm is at most <paramref name="maxNorm"/>; returns the norm before clipping.</summary>
    public static double ClipGradNorm(IEnumerable<Tensor> parameters, double maxNorm)
    {
        var list = parameters.ToList();
        var ps = list.Select(p => p.Handle).ToArray();
        double total;
        fixed (IntPtr* pp = ps) Native.Check(Native.ft_clip_grad_norm(pp, ps.Length, maxNorm, &total));
        GC.KeepAlive(list);
        return total;
    }
}

public static class LrSchedule
{
    /// <summary>Factor in [0,1] multiplying the base learning rate: linear warmup from 0, then constant, linear decay or cosine decay to minRatio.</summary>
    public static double Factor(string kind, long step, long totalSteps, long warmupSteps, double minRatio = 0.0)
    {
        if (warmupSteps > 0 && step < warmupSteps) return (double)step / warmupSteps;
        var decaySteps = Math.Max(1, totalSteps - warmupSteps);
        var progress = Math.Clamp((double)(step - warmupSteps) / decaySteps, 0, 1);
        return kind switch
        {
            "constant" => 1.0,
            "linear" => minRatio + (1 - minRatio) * (1 - progress),
            "cosine" => minRatio + (1 - minRatio) * 0.5 * (1 + Math.Cos(Math.PI * progress)),
            _ => throw new ArgumentException($"unknown schedule '{kind}' (constant, linear or cosine)", nameof(kind)),
        };
    }
}
