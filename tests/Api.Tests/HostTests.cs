using System.Net;
using System.Text.Json;
using FineTune.Domain.Persistence;
using Npgsql;

namespace FineTune.Api.Tests;

public sealed class HostTests(ApiFactory api) : IClassFixture<ApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    [Fact]
    public async Task Health_endpoints_answer_and_ready_checks_the_schema()
    {
        var client = api.CreateClient();
        Assert.Equal(HttpStatusCode.OK, (await client.GetAsync("/health/live", Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await client.GetAsync("/health/ready", Ct)).StatusCode);

        // Forget the last migration: ready must say so (live does not care); put the record back afterwards.
        await using var conn = new NpgsqlConnection(api.Database.ConnectionString);
        await conn.OpenAsync(Ct);
        string name;
        await using (var cmd = new NpgsqlCommand("DELETE FROM schema_migrations WHERE version = $1 RETURNING name", conn))
        {
            cmd.Parameters.Add(new() { Value = DatabaseMigrator.LatestVersion });
            name = (string)(await cmd.ExecuteScalarAsync(Ct))!;
        }
        Assert.Equal(HttpStatusCode.ServiceUnavailable, (await client.GetAsync("/health/ready", Ct)).StatusCode);
        Assert.Equal(HttpStatusCode.OK, (await client.GetAsync("/health/live", Ct)).StatusCode);
        await using (var cmd = new NpgsqlCommand("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", conn))
        {
            cmd.Parameters.Add(new() { Value = DatabaseMigrator.LatestVersion });
            cmd.Parameters.Add(new() { Value = name });
            await cmd.ExecuteNonQueryAsync(Ct);
        }
        Assert.Equal(HttpStatusCode.OK, (await client.GetAsync("/health/ready", Ct)).StatusCode);
    }

    [Fact]
    public async Task Swagger_json_lists_the_endpoints_the_bearer_scheme_and_the_method_union()
    {
        var client = api.CreateClient();
        var response = await client.GetAsync("/swagger/v1/swagger.json", Ct);
        Assert.Equal(HttpStatusCode.OK, response.StatusCode);
        using var doc = JsonDocument.Parse(await response.Content.ReadAsStringAsync(Ct));
        var root = doc.RootElement;
        var paths = root.GetProperty("paths");
        foreach (var path in new[]
        {
            "/v1/fine-tunes", "/v1/fine-tunes/{id}", "/v1/fine-tunes/{id}/cancel", "/v1/fine-tunes/{id}/events",
            "/v1/fine-tunes/{id}/metrics", "/v1/fine-tunes/{id}/checkpoints", "/v1/adapters", "/v1/adapters/{id}",
            "/v1/adapters/{id}/download",
        })
            Assert.True(paths.TryGetProperty(path, out _), $"missing {path}");
        Assert.True(paths.GetProperty("/v1/fine-tunes").TryGetProperty("post", out var post));
        var media = post.GetProperty("requestBody").GetProperty("content").GetProperty("application/json");
        Assert.True(media.GetProperty("examples").TryGetProperty("lora", out _));
        Assert.True(media.GetProperty("examples").TryGetProperty("bone", out _));
        Assert.True(media.GetProperty("examples").TryGetProperty("dora", out _));

        var schemes = root.GetProperty("components").GetProperty("securitySchemes");
        Assert.Equal("bearer", schemes.GetProperty("bearer").GetProperty("scheme").GetString());

        var schemas = root.GetProperty("components").GetProperty("schemas");
        var method = schemas.GetProperty("CreateFineTuneRequest").GetProperty("properties").GetProperty("method");
        var json = method.ToString() + schemas.ToString();
        Assert.Contains("oneOf", json);
        Assert.Contains("LoraMethod", json);
        Assert.Contains("BoneMethod", json);
        Assert.Contains("DoraMethod", json);
        var merge = schemas.GetProperty("CreateFineTuneRequest").GetProperty("properties").GetProperty("merge");
        Assert.Contains("merged/", merge.GetProperty("description").GetString());
        Assert.Contains("\"propertyName\": \"type\"", json.Replace("\"propertyName\":\"type\"", "\"propertyName\": \"type\""));

        Assert.Equal(HttpStatusCode.OK, (await client.GetAsync("/swagger/index.html", Ct)).StatusCode);
    }
}
