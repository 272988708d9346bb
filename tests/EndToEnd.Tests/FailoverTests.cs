using System.Text.Json.Nodes;

namespace FineTune.EndToEnd.Tests;

/// <summary>A worker process killed mid-run (SIGKILL, like a lost machine): Quartz recovers the firing on another
/// node, which takes over the lease and resumes from the last checkpoint instead of starting again.</summary>
public sealed class FailoverTests : IAsyncLifetime
{
    private readonly ServiceFixture _s = new();

    public ValueTask InitializeAsync() => _s.InitializeAsync();
    public ValueTask DisposeAsync() => _s.DisposeAsync();

    [Fact]
    public async Task A_killed_worker_hands_its_job_to_another_node_which_resumes_from_the_checkpoint()
    {
        var first = _s.StartWorkerProcess("node-a");
        var hyper = new { epochs = 1, maxSteps = 60, batchSize = 4, learningRate = 1e-3, maxSeqLength = 64, seed = 5 };
        var job = await _s.SubmitAsync(_s.JobBody(new { type = "lora", r = 4, alpha = 8 }, hyper, "capitals-failover"));
        var id = job["id"]!.GetValue<string>();

        // Wait for node A to have written a checkpoint (CheckpointEvery = 5 in the fixture).
        var deadline = DateTime.UtcNow.AddMinutes(3);
        JsonArray checkpoints;
        do
        {
            await Task.Delay(200);
            var body = JsonNode.Parse(await _s.Client.GetStringAsync($"/v1/fine-tunes/{id}/checkpoints"))!;
            checkpoints = (body is JsonObject o ? o["data"]! : body).AsArray();
            Assert.True(DateTime.UtcNow < deadline, "node A wrote no checkpoint in time");
            Assert.False(first.HasExited, "node A exited by itself");
        } while (checkpoints.Count == 0);
        // The checkpoint's step, not progress.step: progress moves at metrics rows (every 2 steps), so right after the
        // step-5 checkpoint appears it may still read 4.
        var stepAtKill = checkpoints.Max(c => c!["step"]!.GetValue<int>());
        first.Kill(entireProcessTree: true);
        await first.WaitForExitAsync();

        _s.StartWorkerProcess("node-b");
        job = await _s.WaitForAsync(id, ServiceFixture.Finished, TimeSpan.FromMinutes(3));
        Assert.Equal("succeeded", ServiceFixture.Status(job));

        var events = JsonNode.Parse(await _s.Client.GetStringAsync($"/v1/fine-tunes/{id}/events"))!;
        var list = (events is JsonObject eo ? eo["data"]! : events).AsArray();
        var messages = list.Select(e => $"{e!["type"]}: {e["message"]}").ToList();
        Assert.Contains(messages, m => m.Contains("node-b"));
        Assert.Contains(messages, m => m.StartsWith("resumed"));
        var resumedAt = list.First(e => e!["type"]!.GetValue<string>() == "training" && e["message"]!.GetValue<string>().Contains("resumed"));
        Assert.True(stepAtKill >= 5, $"killed at step {stepAtKill}");
        Assert.Contains("resumed at step", resumedAt!["message"]!.GetValue<string>());
        Assert.Equal(60, job["progress"]!["step"]!.GetValue<int>());
    }
}
