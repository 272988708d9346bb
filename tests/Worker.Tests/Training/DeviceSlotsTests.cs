using FineTune.Worker.Runner;
using FineTune.Worker.Torch;

namespace FineTune.Worker.Tests.Training;

/// <summary>Multi-GPU nodes: one job per GPU. The slot logic needs no GPU: devices are values.</summary>
public sealed class DeviceSlotsTests
{
    [Fact]
    public async Task Each_running_job_holds_a_distinct_device_and_a_freed_device_is_handed_out_again()
    {
        var slots = new DeviceSlots([Device.Cuda(0), Device.Cuda(1)]);
        var ct = TestContext.Current.CancellationToken;
        var a = await slots.AcquireAsync(ct);
        var b = await slots.AcquireAsync(ct);
        Assert.NotEqual(a.Device, b.Device);
        Assert.Equal(new[] { Device.Cuda(0), Device.Cuda(1) }, new[] { a.Device, b.Device }.OrderBy(d => d.Index));

        var third = slots.AcquireAsync(ct);
        await Task.Delay(50, ct);
        Assert.False(third.IsCompleted);   // a third job waits for a GPU
        var freed = b.Device;
        b.Dispose();
        b.Dispose();                       // idempotent: the device is not returned twice
        using var c = await third;
        Assert.Equal(freed, c.Device);
        a.Dispose();
    }

    [Fact]
    public void Cpu_nodes_get_their_configured_slots_and_compute_dtype_names_are_checked()
    {
        Assert.Equal(3, DeviceSlots.FromOptions(new WorkerOptions { Device = "cpu", Slots = 3 }).Count);
        Assert.Equal(ScalarType.BFloat16, new WorkerOptions().ParseComputeDType());
        Assert.Equal(ScalarType.Float16, new WorkerOptions { ComputeDType = "fp16" }.ParseComputeDType());
        Assert.Contains("Worker:ComputeDType", Assert.Throws<InvalidOperationException>(() => new WorkerOptions { ComputeDType = "int4" }.ParseComputeDType()).Message);
    }
}
