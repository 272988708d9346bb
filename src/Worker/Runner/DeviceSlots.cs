using FineTune.Worker.Torch;

namespace FineTune.Worker.Runner;

/// <summary>
/// The devices of this node, one job each: a node with N GPUs runs N jobs at once, each pinned to its own GPU.
/// Quartz's thread pool already caps concurrency at the slot count; this hands each running job a distinct device.
/// The job creates every tensor on its lease's device, and the trainer makes that device the current CUDA device at
/// each step (the current device is per thread, and a job resumes on any pool thread after an await). Its dropout masks
/// come from its own seeds, never from a generator that the node's other jobs share (ConcurrentJobsTests).
/// </summary>
public sealed class DeviceSlots
{
    private readonly SemaphoreSlim _free;
    private readonly Stack<Device> _devices;

    public DeviceSlots(IReadOnlyList<Device> devices)
    {
        if (devices.Count == 0) throw new ArgumentException("A worker needs at least one device.", nameof(devices));
        _devices = new Stack<Device>(devices.Reverse());
        _free = new SemaphoreSlim(devices.Count, devices.Count);
        Count = devices.Count;
    }

    public int Count { get; }

    /// <summary>The devices a worker configured with "cpu" or "cuda" has: one CPU slot, or one per visible GPU.</summary>
    public static DeviceSlots FromOptions(WorkerOptions options)
    {
        if (options.Device.Equals("cpu", StringComparison.OrdinalIgnoreCase))
            return new DeviceSlots(Enumerable.Repeat(Device.Cpu, Math.Max(1, options.Slots)).ToList());
        if (!Cuda.IsAvailable()) throw new InvalidOperationException("Worker:Device is 'cuda' but libtorch sees no CUDA device.");
        var count = options.Slots > 0 ? Math.Min(options.Slots, Cuda.DeviceCount()) : Cuda.DeviceCount();
        return new DeviceSlots(Enumerable.Range(0, count).Select(Device.Cuda).ToList());
    }

    public async Task<Lease> AcquireAsync(CancellationToken ct)
    {
        await _free.WaitAsync(ct);
        lock (_devices) return new Lease(this, _devices.Pop());
    }

    public sealed class Lease(DeviceSlots owner, Device device) : IDisposable
    {
        private int _disposed;
        public Device Device { get; } = device;

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
            lock (owner._devices) owner._devices.Push(Device);
            owner._free.Release();
        }
    }
}
