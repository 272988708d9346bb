namespace FineTune.Domain.Dispatch;

/// <summary>Quartz cluster settings (section "Dispatch"). Defaults follow the measurements in ARCHITECTURE.md.</summary>
public sealed class DispatchOptions
{
    public const string Section = "Dispatch";

    /// <summary>Quartz scheduler name: every API and worker process of one deployment uses the same.</summary>
    public string SchedulerName { get; set; } = "finetune";
    /// <summary>How often an idle node polls for new triggers. Quartz's minimum, 1 s, gives ~0.6 s median start latency.</summary>
    public TimeSpan IdleWaitTime { get; set; } = TimeSpan.FromSeconds(1);
    /// <summary>Cluster check-in period of a worker node.</summary>
    public TimeSpan CheckinInterval { get; set; } = TimeSpan.FromSeconds(5);
    /// <summary>How long past a missed check-in a node is declared dead and its jobs recovered elsewhere.
    /// Keep it above the database's failover time: a stall longer than interval + threshold starts a duplicate
    /// (the job runner's lease fences it).</summary>
    public TimeSpan CheckinMisfireThreshold { get; set; } = TimeSpan.FromSeconds(15);
}
