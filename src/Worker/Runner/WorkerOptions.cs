namespace FineTune.Worker.Runner;

/// <summary>Worker node settings (section "Worker").</summary>
public sealed class WorkerOptions
{
    public const string Section = "Worker";

    /// <summary>GPU pools (Quartz execution groups) this node serves, e.g. ["cpu"] or ["gpu-h100"].</summary>
    public string[] Pools { get; set; } = ["cpu"];
    /// <summary>"cpu" or "cuda". On cuda, one slot per visible GPU unless <see cref="Slots"/> says otherwise.</summary>
    public string Device { get; set; } = "cpu";
    /// <summary>Concurrent jobs on this node (0 = one per GPU, 1 on CPU).</summary>
    public int Slots { get; set; }
    /// <summary>dtype of the frozen base weights and activations on a GPU: bf16 (default), fp16 or fp32. The CPU
    /// always computes in fp32. Adapter tensors keep their own precision (hyperparameter adapterDtype).</summary>
    public string ComputeDType { get; set; } = "bf16";

    /// <summary><see cref="ComputeDType"/> as a libtorch dtype; a clear error for an unknown name.</summary>
    public Torch.ScalarType ParseComputeDType() => ComputeDType.ToLowerInvariant() switch
    {
        "bf16" or "bfloat16" => Torch.ScalarType.BFloat16,
        "fp16" or "float16" or "half" => Torch.ScalarType.Float16,
        "fp32" or "float32" or "float" => Torch.ScalarType.Float32,
        _ => throw new InvalidOperationException($"Worker:ComputeDType must be bf16, fp16 or fp32, not '{ComputeDType}'"),
    };
    /// <summary>How often a running job's lease is renewed (and cancel requests polled).</summary>
    public TimeSpan HeartbeatInterval { get; set; } = TimeSpan.FromSeconds(2);
    /// <summary>A running job whose lease is older than this is considered abandoned and may be taken over.</summary>
    public TimeSpan LeaseTimeout { get; set; } = TimeSpan.FromSeconds(30);
    /// <summary>Metrics row every N optimizer steps.</summary>
    public int LogEvery { get; set; } = 5;
    /// <summary>Checkpoint every N optimizer steps.</summary>
    public int CheckpointEvery { get; set; } = 25;
    /// <summary>Keep this many newest checkpoints per job on disk.</summary>
    public int KeepCheckpoints { get; set; } = 2;
    /// <summary>How often the reconciler looks for queued jobs that lost their trigger.</summary>
    public TimeSpan ReconcileInterval { get; set; } = TimeSpan.FromSeconds(15);
    /// <summary>Chat format for models whose tokenizer_config.json has no chat_template: chatml, llama3, llama3.1,
    /// llama2, mistral or mistral-v0.2.</summary>
    public string DefaultChatTemplate { get; set; } = "chatml";
    /// <summary>Node name in leases and events (default: host name + process id).</summary>
    public string? NodeName { get; set; }
}
