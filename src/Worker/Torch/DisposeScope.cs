namespace FineTune.Worker.Torch;

/// <summary>
/// Owns every tensor created on this thread while it is the innermost open scope and frees them on Dispose.
/// Scopes form a thread-local stack; tensors move out with <see cref="Tensor.MoveToOuterScope"/> or <see cref="Keep"/>.
/// </summary>
public sealed class DisposeScope : IDisposable
{
    [ThreadStatic] private static DisposeScope? _current;

    private readonly List<Tensor> _owned = [];
    private bool _disposed;

    private DisposeScope(DisposeScope? outer) { Outer = outer; }

    internal DisposeScope? Outer { get; }

    public static DisposeScope Begin() => _current = new DisposeScope(_current);

    public static DisposeScope? Current => _current;

    /// <summary>Number of tensors this scope still owns (including ones already disposed by hand).</summary>
    public int Count => _owned.Count;

    /// <summary>Detaches <paramref name="t"/> from its scope entirely: the caller owns it.</summary>
    public static Tensor Keep(Tensor t)
    {
        t.Scope?.Remove(t);
        t.Scope = null;
        return t;
    }

    internal void Add(Tensor t)
    {
        if (_disposed) throw new ObjectDisposedException(nameof(DisposeScope));
        _owned.Add(t);
        t.Scope = this;
    }

    internal void Remove(Tensor t)
    {
        // Search from the end: the tensor moved out is usually among the last created.
        var i = _owned.LastIndexOf(t);
        if (i >= 0) _owned.RemoveAt(i);
    }

    public void Dispose()
    {
        if (_disposed) return;
        _disposed = true;
        foreach (var t in _owned)
        {
            t.Scope = null;
            t.Dispose();
        }
        _owned.Clear();
        // Scopes close in LIFO order; if an inner one is left open by mistake, unwind past it.
        if (ReferenceEquals(_current, this)) _current = Outer;
        else
            for (var s = _current; s != null; s = s.Outer)
                if (ReferenceEquals(s.Outer, this)) { _current = Outer; break; }
    }
}
