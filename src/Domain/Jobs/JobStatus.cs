namespace FineTune.Domain.Jobs;

public enum JobStatus { Queued, Running, Succeeded, Failed, Cancelled }
