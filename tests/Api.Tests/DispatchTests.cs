using System.Net;
using Npgsql;

namespace FineTune.Api.Tests;

/// <summary>The API with the real Quartz dispatcher: a submit schedules a trigger in the pool's execution group.</summary>
public sealed class DispatchTests(RealDispatchApiFactory api) : IClassFixture<RealDispatchApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task Submit_schedules_one_quartz_trigger_per_job()
    {
        var client = await api.ClientAsync("quartz");
        var response = await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.Bone), Ct);
        Assert.Equal(HttpStatusCode.Accepted, response.StatusCode);
        var id = (await response.JsonAsync()).GetProperty("id").GetGuid();

        await using var conn = new NpgsqlConnection(api.Database.ConnectionString);
        await conn.OpenAsync(Ct);
        await using var cmd = new NpgsqlCommand("SELECT count(*), max(priority) FROM quartz.qrtz_triggers WHERE trigger_name = $1", conn);
        cmd.Parameters.Add(new() { Value = id.ToString() });
        await using var r = await cmd.ExecuteReaderAsync(Ct);
        Assert.True(await r.ReadAsync(Ct));
        Assert.Equal(1, r.GetInt64(0));
        Assert.Equal(10, r.GetInt32(1));
    }
}
