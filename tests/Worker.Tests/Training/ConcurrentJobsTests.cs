using FineTune.Domain.Jobs;
using FineTune.Domain.Methods;
using FineTune.Worker.Runner;
using FineTune.Worker.Torch;
using FineTune.Worker.Training;

namespace FineTune.Worker.Tests.Training;

/// <summary>
/// A node runs one job per slot at once: N GPUs run N jobs, a CPU node its configured slots. Jobs that run side by
/// side must train exactly as each would alone, dropout masks included (a job's resume replays them), and each must
/// keep its tensors on its own slot's device. On a CUDA host (FINETUNE_TEST_DEVICE=cuda) the jobs go to every visible
/// GPU in turn, so a multi-GPU host checks N jobs on N GPUs; elsewhere they share the CPU, the case where a shared
/// generator would mix their draws.
/// </summary>
[Collection(GlobalGeneratorCollection.Name)]
public sealed class ConcurrentJobsTests
{
    private sealed class Losses : ITrainingReporter
    {
        public List<double> PerStep { get; } = [];
        public ValueTask OnStartedAsync(long totalSteps, long resumedFromStep, CancellationToken ct) => ValueTask.CompletedTask;
        public ValueTask OnMetricsAsync(TrainingMetrics metrics, CancellationToken ct)
        {
            lock (PerStep) PerStep.Add(metrics.Loss);
            return ValueTask.CompletedTask;
        }
        public ValueTask BeforeCheckpointAsync(long step, CancellationToken ct) => ValueTask.CompletedTask;
        public ValueTask OnCheckpointAsync(long step, string path, string sha256, long sizeBytes, CancellationToken ct) => ValueTask.CompletedTask;
    }

    private static IReadOnlyList<Device> NodeDevices() =>
        TestData.Device.Kind == DeviceKind.Cuda
            ? Enumerable.Range(0, Cuda.DeviceCount()).Select(Device.Cuda).ToList()
            : [Device.Cpu];

    private static TrainingSpec Job(int i, Device device, bool? checkpointing = null)
    {
        // Dropout on every adapter input; the second job also recomputes its layers in backward (checkpointing), which
        // must draw the same masks again.
        var method = new LoraMethod { R = 8, Alpha = 16, Dropout = 0.2, TargetModules = MethodSpec.AllModules };
        var hyper = new Hyperparameters
        {
            BatchSize = 4, LearningRate = 1e-2, MaxSteps = 12, Scheduler = "constant", MaxSeqLength = 64, Seed = 100 + i,
            GradientCheckpointing = checkpointing ?? i % 2 == 1,
        };
        return new TrainingSpec(TestData.TinyModelDir, new ByteTokenizer(), TestData.TextSet(), null, method, hyper, device,
            ScalarType.Float32, TestData.TempDir($"ckpt{i}"), null, TestData.TempDir($"out{i}"), 1, 1000, "tiny-base", "abc123");
    }

    [Fact]
    public async Task Jobs_running_side_by_side_train_exactly_as_alone_each_on_its_slot_device()
    {
        var ct = TestContext.Current.CancellationToken;
        var devices = NodeDevices();
        const int jobs = 3;
        var placed = Enumerable.Range(0, jobs).Select(i => devices[i % devices.Count]).ToArray();

        var alone = new List<(List<double> Losses, TrainingResult Result)>();
        for (var i = 0; i < jobs; i++)
        {
            var losses = new Losses();
            var result = await new Trainer().RunAsync(Job(i, placed[i]), losses, ct);
            alone.Add((losses.PerStep, result));
        }
        // Different seeds give different curves: the comparison below can tell the jobs apart.
        Assert.NotEqual(alone[0].Losses[^1], alone[1].Losses[^1]);
        // Job 1 recomputes its layers in backward: the recompute draws the masks of the forward (same seeds), so its
        // curve is the one without checkpointing.
        var plain = new Losses();
        await new Trainer().RunAsync(Job(1, placed[1], checkpointing: false), plain, ct);
        for (var s = 0; s < 12; s++)
            Assert.True(Math.Abs(plain.PerStep[s] - alone[1].Losses[s]) <= 1e-5 * Math.Abs(plain.PerStep[s]),
                $"step {s + 1}: {alone[1].Losses[s]} with checkpointing vs {plain.PerStep[s]} without");

        // The node's way: one slot per device and a lease per running job; here every job at once. The leases of
        // jobs running together are distinct devices (on one device: distinct slots of it).
        var slots = new DeviceSlots(placed);
        var gate = new TaskCompletionSource();
        var leased = new Device[jobs];
        var held = 0;
        var together = Enumerable.Range(0, jobs).Select(i => Task.Run(async () =>
        {
            using var lease = await slots.AcquireAsync(ct);
            leased[i] = lease.Device;
            Interlocked.Increment(ref held);
            await gate.Task;   // all leases held: the jobs start together
            var losses = new Losses();
            var result = await new Trainer().RunAsync(Job(i, lease.Device), losses, ct);
            return (losses.PerStep, result);
        }, ct)).ToArray();
        while (Volatile.Read(ref held) < jobs) await Task.Delay(5, ct);
        Assert.Equal(placed.OrderBy(d => d.Index), leased.OrderBy(d => d.Index));
        gate.SetResult();
        var done = await Task.WhenAll(together);

        for (var i = 0; i < jobs; i++)
        {
            Assert.Equal(12, done[i].PerStep.Count);
            for (var s = 0; s < 12; s++)
                Assert.True(Math.Abs(done[i].PerStep[s] - alone[i].Losses[s]) <= 1e-5 * Math.Abs(alone[i].Losses[s]),
                    $"job {i} on {leased[i]}, step {s + 1}: {done[i].PerStep[s]} side by side vs {alone[i].Losses[s]} alone");
            Assert.Equal(alone[i].Result.FinalLoss, done[i].result.FinalLoss, 1e-5);
        }
    }
}
