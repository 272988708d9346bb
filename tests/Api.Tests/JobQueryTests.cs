using System.Net;
using System.Text.Json;
using FineTune.Domain.Jobs;
using Microsoft.EntityFrameworkCore;

namespace FineTune.Api.Tests;

public sealed class JobQueryTests(ApiFactory api) : IClassFixture<ApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private static async Task<Guid> SubmitAsync(HttpClient client)
    {
        var response = await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Lora), Ct);
        Assert.Equal(HttpStatusCode.Accepted, response.StatusCode);
        return (await response.JsonAsync()).GetProperty("id").GetGuid();
    }

    [Fact]
    public async Task Paging_walks_every_job_newest_first_without_overlap()
    {
        var client = await api.ClientAsync("paging");
        var ids = new List<Guid>();
        for (var i = 0; i < 7; i++) ids.Add(await SubmitAsync(client));

        var seen = new List<Guid>();
        string? cursor = null;
        var pages = 0;
        do
        {
            var url = "/v1/fine-tunes?limit=3" + (cursor is null ? "" : $"&after={cursor}");
            var page = await (await client.GetAsync(url, Ct)).JsonAsync();
            var data = page.GetProperty("data").EnumerateArray().Select(j => j.GetProperty("id").GetGuid()).ToList();
            Assert.True(data.Count is > 0 and <= 3);
            seen.AddRange(data);
            cursor = page.GetProperty("nextCursor").GetString();
            pages++;
        } while (cursor is not null);

        Assert.Equal(3, pages);
        Assert.Equal(Enumerable.Reverse(ids), seen); // v7 ids and created_at both grow: newest first
        var all = await (await client.GetAsync("/v1/fine-tunes", Ct)).JsonAsync();
        Assert.Equal(7, all.GetProperty("data").GetArrayLength());
        Assert.Equal(JsonValueKind.Null, all.GetProperty("nextCursor").ValueKind);
    }

    [Fact]
    public async Task Status_filter_and_bad_query_values()
    {
        var client = await api.ClientAsync("filter");
        var a = await SubmitAsync(client);
        var b = await SubmitAsync(client);
        Assert.Equal(HttpStatusCode.OK, (await client.PostAsync($"/v1/fine-tunes/{a}/cancel", null, Ct)).StatusCode);

        var cancelled = await (await client.GetAsync("/v1/fine-tunes?status=cancelled", Ct)).JsonAsync();
        Assert.Equal([a], cancelled.GetProperty("data").EnumerateArray().Select(j => j.GetProperty("id").GetGuid()));
        var queued = await (await client.GetAsync("/v1/fine-tunes?status=queued", Ct)).JsonAsync();
        Assert.Equal([b], queued.GetProperty("data").EnumerateArray().Select(j => j.GetProperty("id").GetGuid()));

        foreach (var (query, field) in new[] { ("status=done", "status"), ("limit=0", "limit"), ("limit=101", "limit"), ("after=not-a-cursor", "after") })
        {
            var r = await client.GetAsync($"/v1/fine-tunes?{query}", Ct);
            Assert.Equal(HttpStatusCode.BadRequest, r.StatusCode);
            Assert.True((await r.JsonAsync()).GetProperty("errors").TryGetProperty(field, out _), query);
        }
        Assert.Equal(HttpStatusCode.NotFound, (await client.GetAsync($"/v1/fine-tunes/{Guid.NewGuid()}", Ct)).StatusCode);
    }

    [Fact]
    public async Task Cancel_queued_is_immediate_and_a_finished_job_conflicts()
    {
        var client = await api.ClientAsync("cancel");
        var id = await SubmitAsync(client);
        var response = await client.PostAsync($"/v1/fine-tunes/{id}/cancel", null, Ct);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        var job = await response.JsonAsync();
        Assert.Equal("cancelled", job.GetProperty("status").GetString());
        Assert.NotEqual(JsonValueKind.Null, job.GetProperty("finishedAt").ValueKind);

        await using var db = api.Db();
        Assert.Equal(JobStatus.Cancelled, (await db.Jobs.SingleAsync(j => j.Id == id, Ct)).Status);
        Assert.Equal(["queued", "cancelled"], await db.JobEvents.Where(e => e.JobId == id).OrderBy(e => e.Id).Select(e => e.Type).ToListAsync(Ct));

        var again = await client.PostAsync($"/v1/fine-tunes/{id}/cancel", null, Ct);
        Assert.Equal(HttpStatusCode.Conflict, again.StatusCode);
        Assert.Equal("application/problem+json", again.Content.Headers.ContentType?.MediaType);
    }

    [Fact]
    public async Task Cancel_running_sets_the_flag_and_interrupts_and_the_runner_sees_it()
    {
        var client = await api.ClientAsync("cancel-running");
        var id = await SubmitAsync(client);
        await using var db = api.Db();
        var lease = await db.TryClaimAsync(id, "node-1/slot-0", TimeSpan.FromMinutes(1), Ct);
        Assert.NotNull(lease);

        var response = await client.PostAsync($"/v1/fine-tunes/{id}/cancel", null, Ct);
        Assert.Equal(HttpStatusCode.Accepted, response.StatusCode);
        var job = await response.JsonAsync();
        Assert.Equal("running", job.GetProperty("status").GetString());
        Assert.True(job.GetProperty("cancelRequested").GetBoolean());
        Assert.Contains(id, api.Dispatcher.Interrupted);

        Assert.Equal(LeaseState.CancelRequested, await db.HeartbeatAsync(lease, Ct));
        Assert.NotNull(await db.UpdateFencedAsync(lease, j => j.Cancel("Cancelled by request"), Ct));
        var final = await (await client.GetAsync($"/v1/fine-tunes/{id}", Ct)).JsonAsync();
        Assert.Equal("cancelled", final.GetProperty("status").GetString());
    }

    [Fact]
    public async Task Events_metrics_and_checkpoints_are_listed_and_the_stream_ends_when_the_job_is_done()
    {
        var client = await api.ClientAsync("events");
        var id = await SubmitAsync(client);
        await using var db = api.Db();
        var lease = (await db.TryClaimAsync(id, "node-1/slot-0", TimeSpan.FromMinutes(1), Ct))!;
        Assert.True(await db.SetPlanAsync(lease, 10, "abc123", 2, Ct));
        for (var step = 1; step <= 3; step++)
            Assert.True(await db.RecordMetricAsync(lease, new JobMetric
            {
                JobId = id, Step = step, Loss = 2.0 / step, LearningRate = 1e-3, TokensPerSecond = 100, ElapsedSeconds = step,
            }, Ct));
        Assert.True(await db.RecordCheckpointAsync(lease, new JobCheckpoint { JobId = id, Step = 3, Path = "checkpoints/x/3", Sha256 = "ff", SizeBytes = 12 }, Ct));
        Assert.True(await db.AppendEventAsync(lease, "checkpoint", "Checkpoint at step 3", new { step = 3 }, Ct));

        var job = await (await client.GetAsync($"/v1/fine-tunes/{id}", Ct)).JsonAsync();
        Assert.Equal(3, job.GetProperty("progress").GetProperty("step").GetInt32());
        Assert.Equal(10, job.GetProperty("progress").GetProperty("totalSteps").GetInt32());
        Assert.Equal(2.0 / 3, job.GetProperty("lastLoss").GetDouble(), 9);

        var metrics = await (await client.GetAsync($"/v1/fine-tunes/{id}/metrics", Ct)).JsonAsync();
        Assert.Equal([1, 2, 3], metrics.EnumerateArray().Select(m => m.GetProperty("step").GetInt32()));
        Assert.Equal(1.0, metrics[1].GetProperty("loss").GetDouble());
        var checkpoints = await (await client.GetAsync($"/v1/fine-tunes/{id}/checkpoints", Ct)).JsonAsync();
        Assert.Equal(3, Assert.Single(checkpoints.EnumerateArray()).GetProperty("step").GetInt32());

        var events = await (await client.GetAsync($"/v1/fine-tunes/{id}/events", Ct)).JsonAsync();
        Assert.Equal(["queued", "running", "checkpoint"], events.EnumerateArray().Select(e => e.GetProperty("type").GetString()));
        Assert.Equal(3, events[2].GetProperty("data").GetProperty("step").GetInt32());

        Assert.NotNull(await db.UpdateFencedAsync(lease, j => j.Fail("bad_data", "line 2: cannot tokenize"), Ct));
        var stream = new HttpRequestMessage(HttpMethod.Get, $"/v1/fine-tunes/{id}/events");
        stream.Headers.Accept.ParseAdd("text/event-stream");
        var sse = await client.SendAsync(stream, HttpCompletionOption.ResponseHeadersRead, Ct);
        Assert.Equal("text/event-stream", sse.Content.Headers.ContentType?.MediaType);
        var text = await sse.Content.ReadAsStringAsync(Ct); // completes: the job is finished
        Assert.Contains("event: queued", text);
        Assert.Contains("event: failed", text);
        Assert.Contains("\"code\":\"bad_data\"", text);
        var failed = await (await client.GetAsync($"/v1/fine-tunes/{id}", Ct)).JsonAsync();
        Assert.Equal("bad_data", failed.GetProperty("error").GetProperty("code").GetString());
        Assert.Equal("line 2: cannot tokenize", failed.GetProperty("error").GetProperty("message").GetString());

        // Resuming after the last event id sends only what came later (nothing, here) and ends.
        var lastId = events[2].GetProperty("id").GetInt64();
        var tail = await (await client.GetAsync($"/v1/fine-tunes/{id}/events?after={lastId}", Ct)).JsonAsync();
        Assert.Equal(["failed"], tail.EnumerateArray().Select(e => e.GetProperty("type").GetString()));
    }

    [Fact]
    public async Task A_live_event_stream_sends_later_events_and_ends_when_the_job_finishes()
    {
        var client = await api.ClientAsync("live-events");
        var id = await SubmitAsync(client);
        var request = new HttpRequestMessage(HttpMethod.Get, $"/v1/fine-tunes/{id}/events");
        request.Headers.Accept.ParseAdd("text/event-stream");
        var response = await client.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, Ct);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        using var reader = new StreamReader(await response.Content.ReadAsStreamAsync(Ct));

        async Task<string> ReadEventAsync()
        {
            var lines = new List<string>();
            while (await reader.ReadLineAsync(Ct) is { } line && line.Length > 0) lines.Add(line);
            return string.Join("\n", lines);
        }
        Assert.Contains("event: queued", await ReadEventAsync());

        // The job runs and finishes while the client listens.
        await using var db = api.Db();
        var lease = (await db.TryClaimAsync(id, "node-1/slot-0", TimeSpan.FromMinutes(1), Ct))!;
        Assert.Contains("event: running", await ReadEventAsync());
        Assert.NotNull(await db.UpdateFencedAsync(lease, j => j.Succeed(Guid.NewGuid()), Ct));
        var last = await ReadEventAsync();
        Assert.Contains("event: succeeded", last);
        Assert.Matches(@"id: \d+", last);
        Assert.Null(await reader.ReadLineAsync(Ct)); // the server ended the stream
    }

    [Fact]
    public async Task A_body_that_is_not_json_is_415()
    {
        var client = await api.ClientAsync("media-type");
        var r = await client.PostAsync("/v1/fine-tunes", new StringContent("model=tiny", System.Text.Encoding.UTF8, "application/x-www-form-urlencoded"), Ct);
        Assert.Equal(HttpStatusCode.UnsupportedMediaType, r.StatusCode);
        Assert.Equal("application/problem+json", r.Content.Headers.ContentType?.MediaType);
    }

    [Fact]
    public async Task Enqueue_failure_still_answers_202_and_leaves_the_job_queued()
    {
        var client = await api.ClientAsync("dispatch-down");
        api.Dispatcher.Fail = true;
        try
        {
            var id = await SubmitAsync(client);
            await using var db = api.Db();
            Assert.Equal(JobStatus.Queued, (await db.Jobs.SingleAsync(j => j.Id == id, Ct)).Status);
        }
        finally
        {
            api.Dispatcher.Fail = false;
        }
    }
}
