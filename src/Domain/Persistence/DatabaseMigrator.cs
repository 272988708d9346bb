using Npgsql;

namespace FineTune.Domain.Persistence;

/// <summary>
/// Applies the SQL files embedded from Persistence/Migrations (NNNN_name.sql) in order, each in its own transaction,
/// recording them in schema_migrations. A session advisory lock serialises API and workers starting together.
/// </summary>
public static class DatabaseMigrator
{
    private const long LockKey = 0x46_54_4D_49_47_52; // "FTMIGR"
    private const string Prefix = "FineTune.Migrations.";

    public sealed record Migration(int Version, string Name, string Sql);

    public static IReadOnlyList<Migration> Migrations { get; } = Load();

    public static int LatestVersion => Migrations.Count == 0 ? 0 : Migrations[^1].Version;

    /// <summary>Applies the missing migrations; returns the versions applied by this call.</summary>
    public static async Task<IReadOnlyList<int>> MigrateAsync(string connectionString, CancellationToken ct)
    {
        await using var conn = new NpgsqlConnection(connectionString);
        await conn.OpenAsync(ct);
        await Exec(conn, null, $"SELECT pg_advisory_lock({LockKey})", ct);
        try
        {
            await Exec(conn, null, """
                CREATE TABLE IF NOT EXISTS schema_migrations (
                    version integer PRIMARY KEY,
                    name text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now())
                """, ct);
            var applied = new HashSet<int>();
            await using (var cmd = new NpgsqlCommand("SELECT version FROM schema_migrations", conn))
            await using (var r = await cmd.ExecuteReaderAsync(ct))
                while (await r.ReadAsync(ct)) applied.Add(r.GetInt32(0));

            var done = new List<int>();
            foreach (var m in Migrations.Where(m => !applied.Contains(m.Version)))
            {
                await using var tx = await conn.BeginTransactionAsync(ct);
                try
                {
                    await Exec(conn, tx, m.Sql, ct);
                }
                catch (PostgresException e)
                {
                    throw new InvalidOperationException($"Migration {m.Version:0000}_{m.Name} failed: {e.MessageText}", e);
                }
                await using (var rec = new NpgsqlCommand("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", conn, tx))
                {
                    rec.Parameters.Add(new() { Value = m.Version });
                    rec.Parameters.Add(new() { Value = m.Name });
                    await rec.ExecuteNonQueryAsync(ct);
                }
                await tx.CommitAsync(ct);
                done.Add(m.Version);
            }
            return done;
        }
        finally
        {
            // Closing the session would release it too; unlock explicitly because pooled connections stay open.
            await Exec(conn, null, $"SELECT pg_advisory_unlock({LockKey})", CancellationToken.None);
        }
    }

    /// <summary>The highest applied version, or 0 when the database has no migrations table yet.</summary>
    public static async Task<int> AppliedVersionAsync(NpgsqlConnection conn, CancellationToken ct)
    {
        await using var cmd = new NpgsqlCommand(
            "SELECT CASE WHEN to_regclass('schema_migrations') IS NULL THEN 0 ELSE (SELECT coalesce(max(version), 0) FROM schema_migrations) END", conn);
        return Convert.ToInt32(await cmd.ExecuteScalarAsync(ct));
    }

    private static async Task Exec(NpgsqlConnection conn, NpgsqlTransaction? tx, string sql, CancellationToken ct)
    {
        await using var cmd = new NpgsqlCommand(sql, conn, tx);
        await cmd.ExecuteNonQueryAsync(ct);
    }

    private static List<Migration> Load()
    {
        var asm = typeof(DatabaseMigrator).Assembly;
        var list = new List<Migration>();
        foreach (var res in asm.GetManifestResourceNames().Where(n => n.StartsWith(Prefix, StringComparison.Ordinal) && n.EndsWith(".sql", StringComparison.Ordinal)))
        {
            var file = res[Prefix.Length..^".sql".Length];
            var sep = file.IndexOf('_');
            if (sep <= 0 || !int.TryParse(file[..sep], out var version))
                throw new InvalidOperationException($"Migration resource '{res}' is not named NNNN_name.sql");
            using var stream = asm.GetManifestResourceStream(res)!;
            using var reader = new StreamReader(stream);
            list.Add(new Migration(version, file[(sep + 1)..], reader.ReadToEnd()));
        }
        list.Sort((a, b) => a.Version.CompareTo(b.Version));
        var dup = list.GroupBy(m => m.Version).FirstOrDefault(g => g.Count() > 1);
        if (dup is not null) throw new InvalidOperationException($"Two migrations share version {dup.Key}");
        return list;
    }
}
