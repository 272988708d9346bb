namespace FineTune.Worker.Torch;

/// <summary>
/// A tree of named parameters, buffers and submodules. The module owns its tensors (they never belong to a
/// dispose scope) and frees them on Dispose.
/// </summary>
public abstract class Module : IDisposable
{
    private readonly List<(string Name, Tensor Tensor)> _parameters = [];
    private readonly List<(string Name, Tensor Tensor)> _buffers = [];
    private readonly List<(string Name, Module Module)> _modules = [];
    private bool _disposed;

    public bool Training { get; private set; } = true;

    protected T RegisterModule<T>(string name, T module) where T : Module
    {
        CheckName(name);
        _modules.Add((name, module));
        return module;
    }

    /// <summary>Takes ownership of <paramref name="value"/> and sets requires_grad = <paramref name="trainable"/>.</summary>
    protected Tensor RegisterParameter(string name, Tensor value, bool trainable = true)
    {
        CheckName(name);
        DisposeScope.Keep(value);
        value.RequiresGrad = trainable;
        _parameters.Add((name, value));
        return value;
    }

    protected Tensor RegisterBuffer(string name, Tensor value)
    {
        CheckName(name);
        DisposeScope.Keep(value);
        _buffers.Add((name, value));
        return value;
    }

    private void CheckName(string name)
    {
        if (string.IsNullOrEmpty(name) || name.Contains('.'))
            throw new ArgumentException($"invalid member name '{name}'", nameof(name));
        if (_parameters.Any(p => p.Name == name) || _buffers.Any(b => b.Name == name) || _modules.Any(m => m.Name == name))
            throw new ArgumentException($"'{name}' is already registered on {GetType().Name}", nameof(name));
    }

    public IEnumerable<(string Name, Tensor Tensor)> NamedParameters(bool recurse = true) => Walk(m => m._parameters, recurse);
    public IEnumerable<Tensor> Parameters(bool recurse = true) => NamedParameters(recurse).Select(p => p.Tensor);
    public IEnumerable<(string Name, Tensor Tensor)> NamedBuffers(bool recurse = true) => Walk(m => m._buffers, recurse);

    private IEnumerable<(string, Tensor)> Walk(Func<Module, List<(string Name, Tensor Tensor)>> members, bool recurse)
    {
        if (!recurse) return members(this).Select(p => (p.Name, p.Tensor));
        return NamedModules().SelectMany(m => members(m.Module).Select(p => (Join(m.Name, p.Name), p.Tensor)));
    }

    /// <summary>This module as "", then every submodule by dotted path, depth first.</summary>
    public IEnumerable<(string Name, Module Module)> NamedModules()
    {
        yield return ("", this);
        foreach (var (name, child) in _modules)
            foreach (var (sub, m) in child.NamedModules())
                yield return (Join(name, sub), m);
    }

    private static string Join(string prefix, string name) => prefix.Length == 0 ? name : name.Length == 0 ? prefix : $"{prefix}.{name}";

    public Module? GetSubmodule(string dottedPath)
    {
        Module? m = this;
        if (dottedPath.Length == 0) return m;
        foreach (var part in dottedPath.Split('.'))
        {
            m = m._modules.FirstOrDefault(x => x.Name == part).Module;
            if (m == null) return null;
        }
        return m;
    }

    public void Train(bool on = true)
    {
        foreach (var (_, m) in NamedModules()) m.Training = on;
    }

    public void Eval() => Train(false);

    /// <summary>Parameters and buffers by dotted name; the tensors are the module's own (shared storage, not owned by the caller).</summary>
    public Dictionary<string, Tensor> StateDict()
    {
        var d = new Dictionary<string, Tensor>();
        foreach (var (n, t) in NamedParameters()) d[n] = t;
        foreach (var (n, t) in NamedBuffers()) d[n] = t;
        return d;
    }

    /// <summary>Copies values in under no-grad (converting dtype/device as needed).</summary>
    public void LoadStateDict(IReadOnlyDictionary<string, Tensor> state, bool strict = true)
    {
        var own = StateDict();
        var missing = own.Keys.Where(k => !state.ContainsKey(k)).OrderBy(k => k, StringComparer.Ordinal).ToList();
        var unexpected = state.Keys.Where(k => !own.ContainsKey(k)).OrderBy(k => k, StringComparer.Ordinal).ToList();
        var mismatched = own.Where(kv => state.TryGetValue(kv.Key, out var v) && !kv.Value.Shape.SequenceEqual(v.Shape))
            .Select(kv => $"{kv.Key}: expected [{string.Join(",", kv.Value.Shape)}], got [{string.Join(",", state[kv.Key].Shape)}]")
            .ToList();
        var problems = new List<string>();
        if (mismatched.Count > 0) problems.Add("shape mismatch: " + string.Join("; ", mismatched));
        if (strict && missing.Count > 0) problems.Add("missing keys: " + string.Join(", ", missing));
        if (strict && unexpected.Count > 0) problems.Add("unexpected keys: " + string.Join(", ", unexpected));
        if (problems.Count > 0)
            throw new InvalidOperationException($"LoadStateDict into {GetType().Name} failed: {string.Join(" | ", problems)}");
        using var _ = Torch.NoGrad();
        foreach (var (name, target) in own)
            if (state.TryGetValue(name, out var src))
                target.Copy_(src);
    }

    /// <summary>Replaces a parameter of this module (local name) and disposes the old one.</summary>
    public void ReplaceParameter(string name, Tensor value)
    {
        var i = _parameters.FindIndex(p => p.Name == name);
        if (i < 0) throw new ArgumentException($"{GetType().Name} has no parameter '{name}'", nameof(name));
        var old = _parameters[i].Tensor;
        DisposeScope.Keep(value);
        _parameters[i] = (name, value);
        if (!ReferenceEquals(old, value)) old.Dispose();
    }

    public void SetTrainable(bool on)
    {
        foreach (var p in Parameters()) p.RequiresGrad = on;
    }

    public virtual void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var (_, m) in _modules) m.Dispose();
        foreach (var (_, t) in _parameters) t.Dispose();
        foreach (var (_, t) in _buffers) t.Dispose();
        GC.SuppressFinalize(this);
    }
}
